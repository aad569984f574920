"""The vLLM integration's parts, without an engine: block rule, paged layout, overrides, flags, metrics."""

from __future__ import annotations

import argparse

import pytest
import torch

from vllm_kvevict.paged.layout import plan_compaction
from vllm_kvevict.policies.config import PolicyConfig


# ---- the block rule (scheduler and worker both use it) ---------------------------------------------
@pytest.mark.parametrize(
    "prompt_len, per_head, bs, kept, tail_start, freed",
    [
        (1947, 256, 128, 2, 15, 13),  # tail of 27 tokens counts toward the 256
        (2047, 256, 128, 2, 15, 13),  # tail of 127: 129 more tokens need 2 blocks
        (1000, 4096, 128, 7, 7, 0),  # budget above the prompt: nothing to free
        (300, 16, 128, 1, 2, 1),  # at least one block (the sinks) survives
    ],
)
def test_plan_compaction_examples(prompt_len, per_head, bs, kept, tail_start, freed):
    comp = plan_compaction(prompt_len, per_head, bs)
    assert (comp.kept_blocks, comp.tail_start_block, comp.freed_blocks) == (kept, tail_start, freed)
    assert comp.is_noop == (freed == 0)


def test_physical_view_drops_exactly_the_freed_blocks():
    comp = plan_compaction(1947, 256, 128)
    row = list(range(100, 116))  # 16 logical blocks
    assert comp.physical_row(row) == [100, 101, 115]
    assert comp.physical_len(1947) == 1947 - 13 * 128
    assert comp.physical_len(2100) == 2100 - 13 * 128  # decoded tokens land in the tail
    with pytest.raises(ValueError, match="block_size=0"):
        plan_compaction(10, 4, 0)


# ---- the CPU paged layout, against vLLM's own cache-writing kernel ----------------------------------
def _write_with_vllm(num_blocks, heads, bs, dim, row, num_tokens, isa="vec"):
    from vllm import _custom_ops as ops

    cache = torch.zeros(num_blocks, heads, bs, 2 * dim)
    view = cache.view(num_blocks, heads, 2 * bs, dim)
    key_cache, value_cache = view.chunk(2, dim=2)  # exactly how CPU_ATTN hands the cache to the kernel
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(num_tokens, heads, dim, generator=gen)
    values = torch.randn(num_tokens, heads, dim, generator=gen)
    pos = torch.arange(num_tokens)
    slots = row[pos // bs] * bs + pos % bs
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    return cache, keys.transpose(0, 1), values.transpose(0, 1)


@pytest.mark.parametrize("isa, dim", [("vec", 64), ("vec16", 48)])
def test_gather_dense_reads_what_vllms_kernel_wrote(isa, dim):
    from vllm_kvevict.paged.cache_layout import cpu_views
    from vllm_kvevict.paged.compact import gather_dense

    row = torch.tensor([5, 2, 7, 0])  # a scattered block row
    cache, keys, values = _write_with_vllm(8, 3, 32, dim, row, 100, isa)
    k, v = gather_dense(*cpu_views(cache), row, 100)
    assert torch.equal(k, keys) and torch.equal(v, values)
    assert (k.stride(2), k.stride(1)) == (1, dim)  # token-major as from every cache: both paths score alike


def test_compact_moves_each_heads_kept_tokens_to_the_front():
    from vllm_kvevict.paged.cache_layout import cpu_views
    from vllm_kvevict.paged.compact import compact, gather_dense

    row = torch.tensor([5, 2, 7, 0])
    cache, keys, values = _write_with_vllm(8, 3, 32, 64, row, 128)
    untouched = cache[[1, 3, 4, 6]].clone()
    gen = torch.Generator().manual_seed(1)
    kept = torch.stack([torch.randperm(96, generator=gen)[:40].sort().values for _ in range(3)])  # per head
    kept[:, 0] = 0
    compact(*cpu_views(cache), row, kept)
    k, v = gather_dense(*cpu_views(cache), row, 128)
    for h in range(3):
        assert torch.equal(k[h, :40], keys[h, kept[h]])
        assert torch.equal(v[h, :40], values[h, kept[h]])
    assert torch.equal(k[:, 96:], keys[:, 96:]) and torch.equal(v[:, 96:], values[:, 96:])  # tail as written
    assert torch.equal(cache[[1, 3, 4, 6]], untouched)  # other requests' blocks


def test_unsupported_isa_is_a_clear_error():
    from vllm_kvevict.paged.cache_layout import check_cpu_isa

    check_cpu_isa("vec")
    with pytest.raises(NotImplementedError, match="'amx'"):
        check_cpu_isa("amx")


# ---- per-request overrides (what admission turns into HTTP 400) -------------------------------------
SERVER = PolicyConfig.from_dict({"policy": "snapkv", "budget": 256})


@pytest.mark.parametrize(
    "xargs, field, text",
    [
        ({"kv_budget": 0}, "kv_budget", "budget=0"),
        ({"kv_budget": "lots"}, "kv_budget", "budget='lots'"),
        ({"kv_policy": "bogus"}, "kv_policy", "bogus"),
        ({"kv_policy": "tokenselect", "kv_budget": "3/2"}, "kv_budget", "budget=1.5 is out of range"),
        ({"kv_policy": "locret", "kv_weights": "/no/heads.pt"}, "kv_policy", "none were found at '/no/heads.pt'"),
        ({"kv_sink_tokens": -1}, None, "sink_tokens"),
        ({"kv_pyramid_beta": 2.0}, None, "pyramid_beta"),
    ],
)
def test_bad_override_names_the_field(xargs, field, text):
    from vllm_kvevict.integration.vllm.settings import bad_field, validate_request

    with pytest.raises(ValueError) as err:
        validate_request(SERVER, xargs)
    message = str(err.value)
    assert message.startswith("vllm_xargs: ") and text in message, message
    if field is not None:
        assert bad_field(message) == field


def test_locret_needs_eager_execution():
    from vllm_kvevict.integration.vllm.settings import validate_request

    assert validate_request(SERVER, {"kv_policy": "locret"}, eager=True).policy == "locret"
    with pytest.raises(ValueError, match="locret' needs --enforce-eager"):
        validate_request(SERVER, {"kv_policy": "locret"}, eager=False)
    args = _parse(["--kv-policy", "locret", "--enforce-eager"])
    assert args.additional_config["kv_evict"]["policy"] == "locret"


def test_good_overrides_and_other_keys():
    from vllm_kvevict.integration.vllm.settings import validate_request

    assert validate_request(SERVER, None) is SERVER
    assert validate_request(SERVER, {"unrelated": 1}) is SERVER
    assert validate_request(SERVER, {"kv_policy": "none"}).policy == "none"
    cfg = validate_request(SERVER, {"kv_policy": "vatp"})
    assert (cfg.policy, cfg.budget) == ("vatp", 256)  # the server's budget carries over
    assert validate_request(SERVER, {"kv_budget": 0.25}).budget == 0.25


def test_eviction_override_is_allowed_under_prefix_caching():
    """Compaction copies into fresh blocks when prefix caching is on: a `none` server takes eviction
    overrides, and the plans of both sides say so."""
    from vllm_kvevict.core.requests import PlanBook
    from vllm_kvevict.integration.vllm.settings import validate_request

    none = PolicyConfig()
    assert validate_request(none, {"kv_policy": "snapkv", "kv_budget": 128}).policy == "snapkv"
    xargs = {"kv_policy": "snapkv", "kv_budget": 128}
    assert PlanBook(none, 16, 30, copy_on_compact=True).get("r", xargs, 1000).compaction.copy_on_compact
    assert not PlanBook(none, 16, 30).get("r", xargs, 1000).compaction.copy_on_compact


def test_request_plan_falls_back_to_the_full_cache_on_a_bad_override():
    from vllm_kvevict.core.requests import request_plan

    good = request_plan(SERVER, None, 1947, 128, 30)
    assert good.compaction.freed_blocks == 13
    bad = request_plan(SERVER, {"kv_budget": -5}, 1947, 128, 30)
    assert bad.config.policy == "none" and bad.compaction is None


# ---- server flags ------------------------------------------------------------------------------------
def _parse(argv):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kvevict.integration.vllm import cli

    cli.install()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", *argv])
    cli.fold_into_additional_config(args)
    return args


def test_flags_fold_into_additional_config(tmp_path):
    args = _parse(["--kv-policy", "snapkv", "--kv-budget", "0.125", "--kv-window", "16"])
    assert args.additional_config["kv_evict"] == {**PolicyConfig.from_dict(
        {"policy": "snapkv", "budget": 0.125, "window": 16}).to_dict()}
    preset = tmp_path / "p.yaml"
    preset.write_text("policy: nacl\nbudget: 512\n")
    args = _parse(["--kv-config", str(preset), "--kv-budget", "300"])
    assert args.additional_config["kv_evict"]["policy"] == "nacl"
    assert args.additional_config["kv_evict"]["budget"] == 300
    args = _parse(["--additional-config", '{"kv_policy": "streamingllm", "kv_budget": 64}'])
    assert args.additional_config["kv_evict"]["policy"] == "streamingllm"


@pytest.mark.parametrize("argv, text", [(["--kv-budget", "0", "--kv-policy", "snapkv"], "budget=0"),
                                        (["--kv-policy", "tokenselect", "--kv-budget", "1/0"], "budget='1/0' is invalid"),
                                        (["--kv-policy", "locret"], "locret' needs --enforce-eager"),
                                        (["--kv-policy", "snapkv", "--kv-window", "x"], "window")])
def test_bad_flag_is_a_clear_error(argv, text):
    with pytest.raises(ValueError, match=text):
        _parse(argv)


# ---- metrics channel -----------------------------------------------------------------------------------
def test_metrics_survive_vllms_stats_serialization_and_reach_prometheus():
    from prometheus_client import REGISTRY
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_kvevict.integration.vllm.metrics import EvictionCounters, PromMetrics, attach, take

    counters = EvictionCounters()
    counters.add("snapkv", evicted=1664, freed=13, ratio=0.15)
    counters.add("nacl", evicted=100, freed=1, ratio=0.5)
    stats = SchedulerStats()
    attach(stats, counters.drain())
    assert counters.drain() == {}
    wire = MsgpackDecoder(SchedulerStats).decode(MsgpackEncoder().encode(stats))  # engine -> API server
    events = take(wire)
    assert wire.kv_connector_stats is None  # vLLM's own loggers see no connector stats
    assert events == {"compactions": [["snapkv", 1664, 13, 0.15], ["nacl", 100, 1, 0.5]]}

    def value(name, policy):
        return REGISTRY.get_sample_value(name, {"policy": policy}) or 0.0

    before = value("vllm_kvevict:evicted_tokens_total", "snapkv")
    PromMetrics.get().observe(events)
    assert value("vllm_kvevict:evicted_tokens_total", "snapkv") - before == 1664
    assert value("vllm_kvevict:freed_blocks_total", "nacl") >= 1
    assert value("vllm_kvevict:kept_ratio_count", "snapkv") >= 1
    assert counters.freed_blocks == {"snapkv": 13, "nacl": 1}


def test_decode_time_epochs_follow_the_rule():
    comp = plan_compaction(1947, 256, 128, decode_interval=100)  # rounded up to one block
    assert comp.interval_blocks == 1
    assert [comp.point(k) for k in range(3)] == [1947, 2075, 2203]
    assert [comp.epoch(n) for n in (1946, 1947, 2074, 2075, 2203)] == [-1, 0, 0, 1, 2]
    assert comp.next_point(1000) == 1947 and comp.next_point(1947) == 2075
    assert [comp.freed_range(k) for k in range(3)] == [(2, 15), (15, 16), (16, 17)]
    row = list(range(100, 120))
    assert comp.physical_row(row, 1) == [100, 101] + row[16:]
    assert comp.physical_len(2100, 1) == 256 + 2100 - 16 * 128
    # without an interval there is only the prompt's compaction
    once = plan_compaction(1947, 256, 128)
    assert once.next_point(1947) is None and once.epoch(5000) == 0
    # a no-op plan never compacts
    assert plan_compaction(100, 4096, 128, 128).next_point(0) is None


def test_selection_counts_travel_from_worker_to_prometheus():
    """Worker counts -> ModelRunnerOutput (pickled by the MP executor) -> scheduler -> SchedulerStats
    (msgpack) -> API server metrics."""
    import pickle

    from prometheus_client import REGISTRY
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_kvevict.integration.vllm.metrics import EvictionCounters, PromMetrics, attach, take
    from vllm_kvevict.core.state import worker_state
    from vllm_kvevict.integration.vllm.metrics import REPORT_ATTR
    from vllm_kvevict.integration.vllm.worker import _with_worker_report

    store = worker_state().report  # the worker thread's own
    for layer, hit in enumerate([False, True, True]):
        store.record_selection("tokenselect", "r1", hit, 1000 + layer)
    store.record_selection("tokenselect", "r2", False, 700)
    store.record_compaction("snapkv", "r3", 0.25)
    store.record_compaction("snapkv", "r3", 0.5)  # layers add up
    output = pickle.loads(pickle.dumps(_with_worker_report(ModelRunnerOutput(req_ids=[], req_id_to_index={}))))
    report = getattr(output, REPORT_ATTR)
    assert report == {"selection": [["tokenselect", 2, 2, [1001.0, 700.0]]], "compaction_s": [["snapkv", 0.75]]}
    assert store.drain() == {}  # drained once per step

    counters = EvictionCounters()
    counters.add_worker_report(report)
    stats = SchedulerStats()
    attach(stats, counters.drain(kv_tokens={"snapkv": [2000, 400]}))
    events = take(MsgpackDecoder(SchedulerStats).decode(MsgpackEncoder().encode(stats)))
    assert events == {"selection": [["tokenselect", 2, 2, [1001.0, 700.0]]], "compaction_s": [["snapkv", 0.75]],
                      "kv_tokens": {"snapkv": [2000, 400]}}

    def value(name):
        return REGISTRY.get_sample_value(name, {"policy": "tokenselect"}) or 0.0

    before = [value(n) for n in ("vllm_kvevict:selection_cache_hits_total", "vllm_kvevict:selection_cache_misses_total",
                                  "vllm_kvevict:selected_tokens_count", "vllm_kvevict:selected_tokens_sum")]
    PromMetrics.get().observe(events)
    after = [value(n) for n in ("vllm_kvevict:selection_cache_hits_total", "vllm_kvevict:selection_cache_misses_total",
                                 "vllm_kvevict:selected_tokens_count", "vllm_kvevict:selected_tokens_sum")]
    assert [a - b for a, b in zip(after, before)] == [2, 2, 2, 1701.0]
    assert REGISTRY.get_sample_value("vllm_kvevict:kv_cache_tokens", {"policy": "snapkv", "kind": "physical"}) == 400
    assert REGISTRY.get_sample_value("vllm_kvevict:compaction_seconds_sum", {"policy": "snapkv"}) >= 0.75
    PromMetrics.get().observe({"kv_tokens": {}})  # nothing running: the gauges drop to 0
    assert REGISTRY.get_sample_value("vllm_kvevict:kv_cache_tokens", {"policy": "snapkv", "kind": "logical"}) == 0


# ---- per-chunk eviction (Locret) -------------------------------------------------------------------------
def test_chunked_compaction_points_and_blocks():
    from vllm_kvevict.paged.layout import plan_chunked_compaction

    comp = plan_chunked_compaction(4000, 512, 128, 512)  # keep 4 blocks, compact every 4 blocks
    assert (comp.kept_blocks, comp.interval_blocks, comp.start, comp.last_epoch) == (4, 4, 1024, 5)
    points = []
    length = 0
    while (point := comp.next_point(length)) is not None:
        points.append(point)
        length = point
    assert points == [1024, 1536, 2048, 2560, 3072, 3584] and comp.last_point == 3584
    assert [comp.epoch(n) for n in (1023, 1024, 1535, 1536, 3584, 4000, 9000)] == [-1, 0, 0, 1, 5, 5, 5]
    assert comp.freed_range(0) == (4, 8) and comp.freed_range(1) == (8, 12) and comp.freed_range(5) == (24, 28)
    # attention reads the 512 kept tokens then the tail since the last point; blocks accordingly
    assert comp.physical_len(1300) == 512 + 276 and comp.physical_len(4000) == 512 + 416
    row = list(range(100, 132))
    assert comp.physical_row(row, 1) == row[:4] + row[12:]
    # while prefilling, a request holds at most kept + one chunk of blocks
    for length in range(1, 4001):
        epoch = comp.epoch(length - 1) if length > 1 else -1  # the layout before the step writing `length`
        held = -(-comp.physical_len(length, epoch) // 128)
        assert held <= 4 + 4, (length, held)
    # a chunk that is not whole blocks is rounded up; a prompt that never outgrows a chunk is a no-op
    assert plan_chunked_compaction(4000, 512, 128, 300).interval_blocks == 3
    assert plan_chunked_compaction(1000, 512, 128, 512).is_noop
    assert plan_chunked_compaction(1000, 512, 128, 512).next_point(0) is None
    assert plan_chunked_compaction(1024, 1024, 128, 512).is_noop
    first = plan_chunked_compaction(1536, 1000, 128, 512)  # 8 blocks kept: the first point frees 4
    assert (first.kept_blocks, first.start, first.last_epoch, first.freed_range(0)) == (8, 1536, 0, (8, 12))


def test_locret_plan_and_retention():
    from vllm_kvevict.core.requests import plan_for
    from vllm_kvevict.policies.config import PolicyConfig
    from vllm_kvevict.policies.declaration import Need, Trigger

    plan = plan_for(PolicyConfig.from_dict({"policy": "locret", "budget": 512}), 4000, 128, 30)
    assert (plan.compaction.kept_blocks, plan.compaction.start, plan.compaction.last_point) == (4, 1024, 3584)
    policy = plan.policy
    decl = policy.declaration
    assert decl.needs == {Need.PRE_ROPE_QKV} and decl.trigger is Trigger.PER_PREFILL_CHUNK and decl.prefill_chunk == 512
    scores = torch.arange(1024.0).flip(0).repeat(3, 1)  # earliest tokens score highest
    kept = policy.retain(scores, 512)
    assert kept.shape == (3, 512)
    # the last 256 (stabilizers) forced in, the rest the 256 best by score: the first 256
    assert policy.stabilizers == 256
    assert torch.equal(kept[0], torch.cat([torch.arange(256), torch.arange(768, 1024)]))
    sinks = type(policy)(512, {"stabilizers": 0, "sink_tokens": 2})
    low_first = torch.arange(10.0).repeat(3, 1)
    assert sinks.retain(low_first, 4)[0].tolist() == [0, 1, 8, 9]
    qkv = torch.randn(7, policy.heads.shape.in_features)
    assert policy.token_scores(3, qkv).shape == (3, 7)
    with pytest.raises(ValueError, match=r"\(7, 5\)"):
        policy.token_scores(3, qkv[:, :5])


def test_locret_kernel_size_max_pools_predictions_along_tokens():
    """kernel_size > 1 keeps a high-scoring token's neighbours with it (a number's digits survive together)."""
    from vllm_kvevict.policies.config import PolicyConfig

    plain = PolicyConfig.from_dict({"policy": "locret", "budget": 512}).build()
    pooled = PolicyConfig.from_dict({"policy": "locret", "budget": 512, "kernel_size": 3}).build()
    qkv = torch.randn(9, plain.heads.shape.in_features, generator=torch.Generator().manual_seed(0))
    raw = plain.token_scores(5, qkv)
    assert plain.kernel_size == 1 and pooled.kernel_size == 3  # pooling is off by default
    assert torch.equal(pooled.token_scores(5, qkv), raw) and torch.equal(plain.run_scores(raw), raw)
    expected = torch.stack([raw[:, max(0, i - 1): i + 2].max(dim=1).values for i in range(9)], dim=1)
    assert torch.allclose(pooled.run_scores(raw), expected)  # pooled over a compaction's whole run
    with pytest.raises(ValueError, match="kernel_size=0"):
        PolicyConfig.from_dict({"policy": "locret", "kernel_size": 0})


@pytest.mark.parametrize("budget, prompt_len, expect", [(512, 1024, (64, 3)), (512, 2048, (64, 3)), (512, 2049, (256, 1)),
                                                       (0.25, 4000, (64, 3)), (0.125, 4000, (256, 1))])
def test_locret_defaults_follow_the_budgets_share_of_the_prompt(budget, prompt_len, expect):
    """Left to their defaults, stabilizers and kernel_size are 64 and 3 from a budget of 1/4 of the prompt up,
    else 256 and 1; the plan a request runs carries them, and a value that was given stays as given."""
    from vllm_kvevict.core.requests import build_policy, plan_for
    from vllm_kvevict.policies.config import PolicyConfig

    config = PolicyConfig.from_dict({"policy": "locret", "budget": budget})
    auto = plan_for(config, prompt_len, 128, 30)
    assert (auto.policy.stabilizers, auto.policy.kernel_size) == expect
    assert auto.policy.heads is build_policy(config).heads  # resolved copies share the loaded heads
    given = plan_for(PolicyConfig.from_dict({"policy": "locret", "budget": budget, "stabilizers": 100}), prompt_len, 128, 30)
    assert (given.policy.stabilizers, given.policy.kernel_size) == (100, expect[1])
    assert given.compaction == auto.compaction  # the settings move no block


def test_score_store_keeps_pending_chunks_in_order():
    from vllm_kvevict.core.state import ScoreStore

    store = ScoreStore()
    store.add("r", 0, 0, torch.ones(3, 4))
    store.add("r", 0, 4, torch.zeros(3, 2))
    kept, pending = store.take("r", 0)
    assert kept is None and [(f, s.shape[1]) for f, s in pending] == [(0, 4), (4, 2)]
    store.keep("r", 0, torch.ones(3, 2))
    kept, pending = store.take("r", 0)
    assert kept.shape == (3, 2) and pending == []
    store.purge(["r"])
    assert len(store) == 0
