"""The CUDA code path, run here: our backend on vLLM's TRITON_ATTN with our Triton kernels, under Triton's
interpreter inside CPU vLLM (VLLM_KVEVICT_BACKEND=triton), against the CPU path on the same requests.

A tiny random-weight Llama (tests/e2e/tiny_model.py) keeps the interpreter affordable; every policy in
the registry runs in one batch per path, each engine in its own process (`paths_main.py`), with prefix
caching on (copy-on-compact): two snapkv requests and an ada-snapkv one ask about one shared document,
the later ones submitted when the first finishes. The default
model's own check through this path is `test_default_model_through_the_triton_path`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.engine import model_path, run_path
from tests.e2e.tiny_model import make_tiny_llama
from vllm_kvevict.policies.declaration import Need
from vllm_kvevict.policies.registry import get_spec, names

pytestmark = pytest.mark.e2e

BLOCK = 32  # CPU_ATTN needs multiples of 32, TRITON_ATTN of 16: both paths share 32
BUDGET = 64
MAX_TOKENS = 4
ABORTED = "aborted"  # an extra snapkv request, aborted after step 2
SHARED = ("shared-first", "shared-next", "shared-lanes")  # one document, three questions


def tiny_locret_heads(directory: Path) -> Path:
    """Random (seeded) retaining heads shaped for the tiny model: the path, not the quality, is tested."""
    import torch

    from vllm_kvevict.policies.locret import HeadShape, RetainingHeads

    path = directory / "locret_tiny.pt"
    torch.manual_seed(0)
    RetainingHeads(HeadShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, hidden=16)).save(path)
    return path


def overrides(policy: str, heads: Path) -> dict:
    """The request's vllm_xargs: every policy at a small budget, with fields sized for a 2-layer model."""
    extra = {"kv_policy": policy}
    if policy == "none":
        return extra
    extra["kv_budget"] = BUDGET
    fields = {p.name for p in get_spec(policy).params}
    if "floor_alpha" in fields and "pyramid_beta" not in fields:  # head-lanes: room for heads to differ
        extra["kv_budget"] = 112
    if "weights" in fields:  # trained heads: random ones of the tiny model's shape
        extra.update(kv_weights=str(heads), kv_chunk_size=64, kv_stabilizers=16)
    if "n_init" in fields:  # selecting: small fixed windows, and prefill pieces that select too
        extra.update(kv_budget=32, kv_n_init=16, kv_n_local=32, kv_prefill_chunk=64, kv_similarity_threshold=-1.0)
    return extra


def prompt(tokenizer, offset: int, tokens: int) -> str:
    import pydoc_data.topics as topics

    ids = tokenizer(" ".join(topics.topics.values()))["input_ids"][offset : offset + tokens]
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(root / "llama", model_path())
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [prompt(tok, 0, 150), prompt(tok, 5000, 160)]
    heads = tiny_locret_heads(root)
    requests = [{"id": policy, "prompt": prompts[k % 2], "max_tokens": MAX_TOKENS, "xargs": overrides(policy, heads)}
                for k, policy in enumerate(names())]
    requests.append({**requests[names().index("snapkv")], "id": ABORTED})
    document = prompt(tok, 10000, 200)
    for k, (rid, policy) in enumerate(zip(SHARED, ("snapkv", "snapkv", "ada-snapkv"))):
        requests.append({"id": rid, "prompt": document + prompt(tok, 20000 + 50 * k, 12), "max_tokens": MAX_TOKENS,
                         "xargs": overrides(policy, heads), **({"after": SHARED[0]} if k else {})})
    engine = {"dtype": "float32", "enforce_eager": True, "block_size": BLOCK, "max_model_len": 1024, "seed": 0,
              "enable_prefix_caching": True, "num_gpu_blocks_override": 200, "max_num_batched_tokens": 640,
              "additional_config": {"kv_evict": {"policy": "none"}}}
    return {"model": str(model), "engine": engine, "requests": requests, "tok": tok}


@pytest.fixture(scope="module")
def runs(tiny) -> dict:
    """Both paths on every policy, with the same schedule: one request aborted after step 2, every running
    request preempted (and recomputed) after step 3."""
    spec = {"model": tiny["model"], "engine": tiny["engine"], "requests": tiny["requests"], "abort": [ABORTED],
            "preempt_after": 3}
    none = [r for r in tiny["requests"] if r["id"] == "none"]
    uncached = {**spec, "engine": {**tiny["engine"], "enable_prefix_caching": False}}
    return {"triton": run_path("triton", spec), "cpu": run_path("cpu", spec), "cpu-uncached": run_path("cpu", uncached),
            "stock": run_path("stock-triton", {**spec, "requests": none, "abort": []})}


def test_runs_through_our_triton_backend_and_the_cpu_backend(runs):
    assert runs["triton"]["backend"].endswith("triton_backend.KVEvictTritonBackend")
    assert runs["cpu"]["backend"].endswith("backend.KVEvictCPUBackend")
    assert runs["stock"]["backend"] == "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"


def test_none_is_token_identical_to_stock_triton_attention(runs):
    assert runs["triton"]["outputs"]["none"] == runs["stock"]["outputs"]["none"]


def test_every_policy_gives_the_cpu_paths_tokens_and_kept_indices(runs):
    triton, cpu = runs["triton"], runs["cpu"]
    assert set(triton["outputs"]) == set(cpu["outputs"]) == set(names()) | set(SHARED)
    assert triton["outputs"] == cpu["outputs"]
    assert triton["preempted"] == cpu["preempted"] >= 3
    evicting = set(names("evict")) | set(SHARED)
    assert evicting <= set(cpu["kept"])  # every evicting request logged its compactions
    for rid in evicting:
        assert triton["kept"][rid] == cpu["kept"][rid], rid  # per layer, per KV head
    lanes = [len(set(map(len, heads))) > 1 for layer in triton["kept"]["ada-snapkv"].values() for heads in [layer]]
    assert any(lanes)  # ragged head-lanes: heads kept different counts
    assert triton["picked"] == cpu["picked"] and triton["picked"]["tokenselect"]  # TokenSelect's selections
    assert triton["selection"] == cpu["selection"] and min(triton["selection"]) > 0  # cache hits and misses


def test_a_shared_document_is_read_from_the_prefix_cache_on_both_paths(runs):
    """Copy-on-compact through the Triton kernels: the later requests read the document the first one
    compacted from the prefix cache (full blocks before its observation window, as on the CPU path), and
    every request answers as it does with prefix caching off; a selecting request (its prefill pieces
    start where a step starts, so its answer depends on the schedule, which the cache changes) reads
    no further than its first selecting context."""
    for path in ("triton", "cpu"):
        cached = runs[path]["cached"]
        assert cached["shared-first"] == 0 and cached["shared-next"] >= 4 * BLOCK, (path, cached)
        assert cached["shared-lanes"] == cached["shared-next"], (path, cached)
    assert runs["triton"]["cached"] == runs["cpu"]["cached"]
    assert not any(runs["cpu-uncached"]["cached"].values())
    selecting = set(names("select"))
    for rid, tokens in runs["cpu-uncached"]["outputs"].items():
        if rid not in selecting:
            assert tokens == runs["cpu"]["outputs"][rid], rid
    first_selecting = 16 + 32 + 32 + 1  # n_init + k + n_local + 1 (overrides)
    assert all(0 < runs["cpu"]["cached"][rid] <= first_selecting // BLOCK * BLOCK for rid in selecting)


def test_compaction_frees_the_rules_blocks_and_every_block_returns(runs, tiny):
    from vllm_kvevict.core.requests import plan_for
    from vllm_kvevict.policies.config import PolicyConfig

    tok = tiny["tok"]
    for report in (runs["triton"], runs["cpu"]):
        assert report["free"][0] == report["free"][1]  # aborted, preempted and finished: every block is back
    report = runs["triton"]
    for request in tiny["requests"]:
        if request["id"] == ABORTED:
            continue
        config = PolicyConfig.from_dict({k[3:]: v for k, v in request["xargs"].items()})
        plan = plan_for(config, len(tok(request["prompt"])["input_ids"]), BLOCK, 2)
        held = report["held"][request["id"]]
        comp = plan.compaction
        full = -(-len(tok(request["prompt"])["input_ids"]) // BLOCK)
        if comp is None or comp.is_noop:
            assert held[-1] >= full, (request["id"], held)  # nothing freed
            continue
        after = comp.kept_blocks + (full - comp.tail_start_block)
        # after compaction it holds the rule's blocks (+1 where the first decoded token opens a new block);
        # never more than the whole prompt and, for one step, the n fresh blocks copy-on-compact writes
        # into (preempted requests recompute, and are compacted again)
        assert max(held) <= full + comp.kept_blocks and {after, after + 1} & set(held), (request["id"], held)


def default_model_overrides(policy: str) -> dict:
    """Every policy on a 69-token prompt (2 full blocks of 32 + 5): budgets that keep 1 block of 2."""
    extra = {"kv_policy": policy}
    if policy == "none":
        return extra
    extra["kv_budget"] = 36
    fields = {p.name for p in get_spec(policy).params}
    if "weights" in fields:  # the shipped heads; compacts at the chunk ending at 64 down to 1 block
        extra.update(kv_budget=16, kv_chunk_size=32, kv_stabilizers=8)
    if "n_init" in fields:  # selecting from the second prefill piece on and at every decode step
        extra.update(kv_budget=16, kv_n_init=4, kv_n_local=16, kv_prefill_chunk=32, kv_similarity_threshold=-1.0)
    return extra


def one_policy_per_path() -> list[str]:
    """A policy per distinct way the core acts on memory (trigger x kept layout, from the declarations):
    the tiny model above runs every policy; the 30-layer model under the interpreter costs about a
    minute per request, so it runs these. Uniform layer budgets first (a pyramid's largest layer may
    hold the whole short prompt), then those that need the most."""
    from vllm_kvevict.policies.config import PolicyConfig

    chosen: dict[tuple, tuple] = {}
    for name in names("evict") + names("select"):
        decl = PolicyConfig(name).build().declaration
        key = (decl.trigger, decl.layout)
        # Need.VALUES only adds the values to the same dense view: not a path of its own
        rank = (decl.layer_budget.value != "uniform", -len(decl.needs - {Need.VALUES}))
        if key not in chosen or rank < chosen[key][0]:
            chosen[key] = (rank, name)
    return [name for _, name in chosen.values()]


def test_default_model_through_the_triton_path():
    """The real model, 30 layers under the interpreter, one policy per memory path in one batch (about 5
    minutes): each compacts, holds fewer blocks than the full cache and answers token for token as on the CPU path, keeping the
    same tokens in every (layer, KV head); TokenSelect picks the same positions."""
    from transformers import AutoTokenizer

    model = model_path()
    tok = AutoTokenizer.from_pretrained(model)
    texts = [prompt(tok, 0, 69), prompt(tok, 5000, 69)]
    policies = one_policy_per_path()
    assert len(policies) == 4 and "tokenselect" in policies and "ada-snapkv" in policies, policies
    requests = [{"id": policy, "prompt": texts[k % 2], "max_tokens": 3, "xargs": default_model_overrides(policy)}
                for k, policy in enumerate(policies)]
    engine = {"dtype": "float32", "enforce_eager": True, "block_size": BLOCK, "max_model_len": 512, "seed": 0,
              "enable_prefix_caching": False, "num_gpu_blocks_override": 40, "max_num_batched_tokens": 512,
              "additional_config": {"kv_evict": {"policy": "none"}}}
    spec = {"model": model, "engine": engine, "requests": requests}
    triton, cpu = run_path("triton", spec), run_path("cpu", spec)
    assert triton["outputs"] == cpu["outputs"] and all(len(t) == 3 for t in cpu["outputs"].values())
    assert set(cpu["outputs"]) == set(policies)
    for policy in set(policies) & set(names("evict")):
        assert triton["kept"][policy] == cpu["kept"][policy], policy
        assert len(cpu["kept"][policy]) == 30, policy  # every layer compacted
        held = triton["held"][policy]
        text = next(r["prompt"] for r in requests if r["id"] == policy)
        uncompacted = -(-(len(tok(text)["input_ids"]) + 3) // BLOCK)  # prompt + 3 tokens in full blocks
        assert held[-1] < uncompacted, (policy, held)  # it ends holding less than the full cache would
    assert triton["picked"] == cpu["picked"] and triton["picked"]["tokenselect"]
    assert triton["selection"] == cpu["selection"]
    assert triton["free"][0] == triton["free"][1]
