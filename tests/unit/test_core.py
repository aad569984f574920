"""The eviction core without vLLM: request plans, the step plan's metadata rewrite, and a layer's
capture -> compaction -> attention on a hand-made cache in CPU_ATTN's layout (the torch adapter)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vllm_kvevict.core.adapter import TORCH_CPU
from vllm_kvevict.core.compaction import compact_due
from vllm_kvevict.core.eviction import LayerEviction, plan_step
from vllm_kvevict.core.requests import PlanBook, plan_for
from vllm_kvevict.core.state import WorkerState
from vllm_kvevict.core.step import RowInfo, StepContext
from vllm_kvevict.paged.cache_layout import cpu_views
from vllm_kvevict.paged.compact import gather_dense
from vllm_kvevict.paged.lanes import LaneMap, lane_attention_row
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.plan import LayerView

BS, HKV, GROUP, DIM = 16, 2, 2, 16


def config(policy: str, budget, **params) -> PolicyConfig:
    return PolicyConfig.from_dict({"policy": policy, "budget": budget, **params})


def test_plan_book_works_a_plan_out_once_and_forgets_it():
    book = PlanBook(config("snapkv", 256), 128, 30)
    first = book.get("r1", None, 1947)
    assert book.get("r1", {"kv_budget": 64}, 1947) is first  # per request, not per call
    assert first.compaction.freed_blocks == 13
    assert book.get("r2", {"kv_budget": -5}, 1947).config.policy == "none"  # a bad override keeps the full KV
    assert book.get("r3", {"kv_policy": "tokenselect"}, 1947).selects
    book.forget(["r1", "r2"])
    assert len(book) == 1 and book.get("r1", {"kv_budget": 64}, 1947).compaction.kept_tokens == 128


def test_a_prefix_cache_hit_never_covers_what_the_policy_scores_from():
    """The window queries are computed, a policy scoring every token's q/k/v computes them all, one scoring
    from the keys alone takes any hit short of its compaction point (a recomputed request's tokens run past
    its prompt: a hit over the whole prompt would skip the compaction), no eviction any hit."""
    def limit(policy, budget, prompt_len=1000, **params):
        return plan_for(config(policy, budget, **params), prompt_len, BS, 30, True).cacheable_prefix

    assert limit("snapkv", 256) == 1000 - 32 and limit("snapkv", 256, window=64) == 1000 - 64
    assert limit("nacl", 256) == 1000 - 10  # its proxies: 1% of the prompt
    assert limit("locret", 256) == 0
    assert limit("streamingllm", 256) == limit("keynorm", 256) == 1000 - 1 and limit("none", None) is None
    assert limit("snapkv", 2000) is None  # a prompt under the budget is not compacted


@pytest.mark.parametrize("budget", [256, 0.25, 0.9, 1.0])
def test_a_selecting_request_shares_and_reads_only_the_full_caches_kv(budget):
    """TokenSelect attends to everything until its first selecting context: the KV below it is the full
    cache's (shared both ways), past it its own sparse attention's (neither offered nor read)."""
    plan = plan_for(config("tokenselect", budget, n_init=16, n_local=64), 1000, BS, 30, True)
    first = plan.shareable_prefix
    assert plan.cacheable_prefix == first
    if budget == 1.0:
        assert first is None  # selects nothing, ever
        return
    assert plan.policy.selects(first) and not any(plan.policy.selects(n) for n in range(first))
    if budget == 256:
        assert first == 16 + 256 + 64 + 1


@pytest.mark.parametrize("policy", ["snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv"])
def test_the_plan_holds_its_largest_layers_count_per_head(policy):
    """Every layer's lane compaction reads the request's largest per-head count from its plan (worked out
    once per request), not from a walk over every layer's budget; a pyramid's largest layer is its first."""
    plan = plan_for(config(policy, 256), 2100, BS, 30)
    counts = [plan.policy.tokens_per_head(2100, layer, 30) for layer in range(30)]
    assert plan.max_tokens_per_head == max(counts)
    assert (counts[-1] < max(counts)) == ("pyramid" in policy)
    assert plan_for(config("none", None), 2100, BS, 30).max_tokens_per_head == 0


def _row(req_id, policy, budget, prompt_len, computed, scheduled, layers=1, copy=False, num_blocks=0, **params):
    plan = plan_for(config(policy, budget, **params), prompt_len, BS, layers, copy)
    return RowInfo(req_id, computed, scheduled, prompt_len, plan, num_blocks)


def test_plan_step_rewrites_lengths_and_rows_to_the_physical_layout():
    rows = (
        _row("snap", "snapkv", 48, 150, 160, 1),  # compacted: kept 3 blocks, tail from block 9
        _row("ada", "ada-snapkv", 48, 150, 160, 1),  # compacted in lanes: the core attends, vLLM reads 1 token
        _row("ts", "tokenselect", 8, 150, 300, 1, n_init=4, n_local=16),  # selects: likewise
        _row("fill", "snapkv", 48, 150, 128, 22),  # reaches its point in this step
        _row("full", "none", None, 150, 160, 1),
    )
    snap = rows[0].plan.compaction
    assert (snap.kept_blocks, snap.tail_start_block) == (3, 9)
    state = WorkerState()
    state.lanes.put("ada", 0, LaneMap.build([40, 56], BS), 1, torch.device("cpu"))
    table = torch.arange(5 * 20).view(5, 20)
    seq_lens = torch.tensor([161, 161, 301, 150, 161])
    query_start = [0, 1, 2, 3, 25, 26]
    plan, lens, new_table = plan_step(StepContext(rows, 1), query_start, seq_lens, table, state)
    assert lens.tolist() == [3 * BS + 161 - 9 * BS, 1, 1, 150, 161]
    assert new_table[0, :5].tolist() == [0, 1, 2, 9, 10] and torch.equal(new_table[3:], table[3:])
    assert list(state.due) == ["fill"] and torch.equal(state.due["fill"].table, table[3])  # compacted before the next
    assert state.due["fill"].row is rows[3]
    assert torch.equal(plan.logical_tables, table)
    lanes = plan.lanes
    assert lanes.rows == (1,) and lanes.token_index.tolist() == [1] and lanes.query_pos.tolist() == [161 - 9 * BS - 1]
    assert lanes.num_compacted.tolist() == [3] and lanes.lane_maps[0, 0].tolist() == [[0, 3], [40, 56]]
    assert seq_lens.tolist() == [161, 161, 301, 150, 161]  # the caller's tensors are not touched


def _cache_with_prompt(num_tokens: int, seed: int, spare: int = 4):
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(num_tokens / BS) + spare
    cache = torch.zeros(blocks + 3, HKV, BS, 2 * DIM)
    row = torch.randperm(blocks + 3, generator=gen)[:blocks]
    keys, values = cpu_views(cache)
    # head 0 attends diffusely (tiny keys), head 1 to a few aligned tokens: Ada-KV gives them different lanes
    k = torch.randn(HKV, num_tokens, DIM, generator=gen) * 0.01
    k[1, torch.randperm(num_tokens - 40, generator=gen)[:3]] = 4.0
    v = torch.randn(HKV, num_tokens, DIM, generator=gen)
    pos = torch.arange(num_tokens)
    keys[row[pos // BS], :, pos % BS] = k.transpose(0, 1)
    values[row[pos // BS], :, pos % BS] = v.transpose(0, 1)
    return cache, row, k, v, gen


@pytest.mark.parametrize("policy", ["snapkv", "ada-snapkv"])
def test_a_layer_captures_compacts_and_attends_like_the_policy_says(policy):
    prompt = 400
    cache, row, k, v, gen = _cache_with_prompt(prompt, seed=len(policy))
    query = torch.randn(prompt, HKV * GROUP, DIM, generator=gen) * 0.1 + 1.0
    state = WorkerState()
    layer = LayerEviction(0, TORCH_CPU, DIM**-0.5, state)
    prefill = _row("r", policy, 96, prompt, 0, prompt)
    comp = prefill.plan.compaction
    table = row[None].clone()
    plan, _, _ = plan_step(StepContext((prefill,), 1), [0, prompt], torch.tensor([prompt]), table, state)
    layer.before_attention(plan, query)
    before = cache.clone()
    layer.after_attention(plan, query, cache, torch.zeros(prompt, HKV * GROUP * DIM))
    assert torch.equal(cache, before) and list(state.due) == ["r"]  # the step's own attention read it all
    compact_due(state, [(layer, cache)], 1)  # what the worker runs before the next forward
    assert not state.due

    # what the policy keeps, from the same dense view and window queries
    pol = prefill.plan.policy
    view = LayerView(k, v, query[-32:].transpose(0, 1))
    region = comp.compactable_tokens
    keys, values = cpu_views(cache)
    if policy == "snapkv":
        kept = torch.stack(pol.plan_rect(view, region, comp.kept_tokens).indices)
        got_k, got_v = gather_dense(keys, values, row, comp.kept_tokens)
        assert torch.equal(got_k, k.gather(1, kept[..., None].expand(-1, -1, DIM)))
        assert torch.equal(got_v, v.gather(1, kept[..., None].expand(-1, -1, DIM)))
        return
    plan_lanes = pol.plan_lanes(view, region, comp.kept_blocks * HKV, BS)
    lanes = LaneMap.build(plan_lanes.lengths, BS)
    maps = state.lanes.get("r")
    assert maps[0].tolist() == [list(lanes.starts), list(lanes.lengths)] and len(set(lanes.lengths)) > 1

    # a decode step: the core's lane attention equals the naive per-head reference over kept + tail
    decode = _row("r", policy, 96, prompt, prompt, 1)
    pos = torch.tensor([prompt])
    q = torch.randn(1, HKV * GROUP, DIM, generator=gen)
    keys[row[pos // BS], :, pos % BS] = torch.randn(1, HKV, DIM, generator=gen)
    values[row[pos // BS], :, pos % BS] = torch.randn(1, HKV, DIM, generator=gen)
    plan, lens, physical = plan_step(StepContext((decode,), 1), [0, 1], torch.tensor([prompt + 1]), table, state)
    assert lens.tolist() == [1]
    out = torch.zeros(1, HKV * GROUP * DIM)
    layer.before_attention(plan, q)
    layer.after_attention(plan, q, cache, out)
    tail = prompt + 1 - comp.compactable_tokens
    want = lane_attention_row(q, keys, values, physical[0], lanes, comp.kept_blocks, tail, DIM**-0.5)
    torch.testing.assert_close(out.view_as(want), want, rtol=1e-5, atol=1e-5)


def test_decode_rows_select_in_one_batch_like_the_dense_policy():
    """Two selecting requests decode in one step: the batched path picks what the dense policy picks (per
    request, per layer) and attends like dense attention over that selection; the next step reuses."""
    policy_args = dict(n_init=8, n_local=16, similarity_threshold=-1.0)
    ctxs = [300, 260]
    caches = [_cache_with_prompt(c + 1, seed=c) for c in ctxs]  # the decode token's K/V is written too
    # one pool holding both requests' blocks: the second's block row is shifted past the first's
    cache = torch.cat([caches[0][0], caches[1][0]])
    rows = [caches[0][1], caches[1][1] + caches[0][0].shape[0]]
    width = max(r.numel() for r in rows)
    table = torch.stack([torch.cat([r, r[-1:].expand(width - r.numel())]) for r in rows])
    state = WorkerState()
    layer = LayerEviction(0, TORCH_CPU, DIM**-0.5, state)
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(2, HKV * GROUP, DIM, generator=gen)
    step = StepContext(tuple(_row(f"r{i}", "tokenselect", 32, c - 20, c, 1, **policy_args) for i, c in enumerate(ctxs)), 1)
    plan, lens, _ = plan_step(step, [0, 1, 2], torch.tensor([c + 1 for c in ctxs]), table, state)
    assert lens.tolist() == [1, 1]  # vLLM's kernel reads only the query's own token
    out = torch.zeros(2, HKV * GROUP * DIM)
    layer.after_attention(plan, query, cache, out)
    for i, (c, (_, _, k, v, _)) in enumerate(zip(ctxs, caches)):
        policy = step.rows[i].plan.policy
        chosen = policy.select(query[i], k[:, :c])  # the dense policy, over the cached context
        pos = torch.cat([chosen, torch.tensor([c])])
        q = query[i].view(HKV, GROUP, DIM)
        probs = torch.softmax(torch.einsum("hgd,htd->hgt", q, k[:, pos]) * DIM**-0.5, dim=-1)
        want = torch.einsum("hgt,htd->hgd", probs, v[:, pos]).reshape(-1)
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
    layer.after_attention(plan, query, cache, out)  # the same queries again: both rows hit
    report = state.report.drain()["selection"]
    assert report[0][:3] == ["tokenselect", 2, 2] and report[0][3] == [8 + 32 + 16, 8 + 32 + 16]


def test_a_head_lane_request_refills_its_lanes_at_decode_time_points():
    """ada-snapkv with decode_interval=32 (two blocks): at KV length 400 + 32 every head keeps its lane
    count and refills its lanes with its best tokens among them and the 32-token tail; the lanes then hold
    exactly the K/V of the logical positions the kept log reports, the tail's window among them, and the
    next decode step attends over [refilled lanes | new tail] like the naive per-head reference."""
    from vllm_kvevict.core.state import KeptLog

    prompt, interval = 400, 32
    cache, row, k, v, gen = _cache_with_prompt(prompt + interval + 1, seed=11)
    keys, values = cpu_views(cache)
    state = WorkerState()
    state.kept = KeptLog()
    layer = LayerEviction(0, TORCH_CPU, DIM**-0.5, state)
    table = row[None].clone()
    all_q = torch.randn(prompt + interval + 1, HKV * GROUP, DIM, generator=gen) * 0.1 + 1.0

    def step(computed: int, scheduled: int) -> tuple:
        r = _row("r", "ada-snapkv", 96, prompt, computed, scheduled, window=8, decode_interval=interval)
        plan, lens, physical = plan_step(StepContext((r,), 1), [0, scheduled], torch.tensor([computed + scheduled]),
                                         table, state)
        q = all_q[computed : computed + scheduled]
        out = torch.zeros(scheduled, HKV * GROUP * DIM)
        layer.before_attention(plan, q)
        layer.after_attention(plan, q, cache, out)
        compact_due(state, [(layer, cache)], 1)
        return r, physical, out

    r, _, _ = step(0, prompt)
    comp = r.plan.compaction
    assert comp.interval_blocks == 2 and comp.point(1) == prompt + interval
    before = [p.clone() for p in state.kept.items[("r", 0)]]
    lengths = state.lanes.get("r")[0, 1].tolist()
    for pos in range(prompt, prompt + interval):  # decode up to the point; the last step reaches it
        step(pos, 1)
    after = state.kept.items[("r", 0)]
    assert state.lanes.get("r")[0, 1].tolist() == lengths  # lane counts stay
    lanes = LaneMap.build(lengths, BS)
    for h in range(HKV):
        assert after[h].numel() == lengths[h] and torch.equal(after[h], torch.sort(after[h]).values)
        assert set(range(prompt + interval - 8, prompt + interval)) <= set(after[h].tolist())  # the window
        old = set(after[h].tolist()) - set(range(prompt, prompt + interval))
        assert old <= set(before[h].tolist()) and len(old) < len(before[h])  # some old tokens made room
        r_, lane, slot = lanes.addresses(h)
        assert torch.equal(keys[row[r_], lane, slot], k[h, after[h]])  # the lanes hold what the log says
        assert torch.equal(values[row[r_], lane, slot], v[h, after[h]])
    # the next step reads the refilled lanes, then the tail from C_1 = 432
    r, physical, out = step(prompt + interval, 1)
    assert r.epoch == 1
    want = lane_attention_row(all_q[-1:], keys, values, physical[0], lanes, comp.kept_blocks, 1, DIM**-0.5)
    torch.testing.assert_close(out.view_as(want), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["snapkv", "ada-snapkv"])
def test_copy_on_compact_writes_the_kept_tokens_into_fresh_blocks_and_leaves_the_prompt_alone(policy):
    """Prefix caching on: compaction 0 writes exactly what in-place compaction writes to row[0:n], into
    the n blocks after the prompt's, and no prompt block changes; `copied_row` then makes them the row's
    front, so attention reads the same compacted region."""
    prompt = 400
    cache, row, _, _, gen = _cache_with_prompt(prompt, seed=7, spare=8)
    query = torch.randn(prompt, HKV * GROUP, DIM, generator=gen) * 0.1 + 1.0
    results = {}
    for copy in (False, True):
        state = WorkerState()
        layer = LayerEviction(0, TORCH_CPU, DIM**-0.5, state)
        work = cache.clone()
        prefill = _row("r", policy, 96, prompt, 0, prompt, copy=copy, num_blocks=len(row))
        plan, _, _ = plan_step(StepContext((prefill,), 1), [0, prompt], torch.tensor([prompt]), row[None].clone(), state)
        layer.before_attention(plan, query)
        layer.after_attention(plan, query, work, torch.zeros(prompt, HKV * GROUP * DIM))
        compact_due(state, [(layer, work)], 1)
        results[copy] = (work, prefill.plan.compaction, state)
    (in_place, comp, _), (copied, copy_comp, state) = results[False], results[True]
    assert copy_comp.copy_on_compact and not comp.copy_on_compact and state.fresh_rows == {"r"}
    n, fresh = comp.kept_blocks, copy_comp.fresh_block
    assert fresh == math.ceil(prompt / BS)
    prompt_blocks = row[:fresh]
    assert torch.equal(copied[prompt_blocks], cache[prompt_blocks])  # the prefix cache's blocks are intact
    assert not torch.equal(in_place[row[:n]], cache[row[:n]])  # (in place, they are not)
    moved, released = copy_comp.copied_row(row.tolist(), -1)
    assert released == row[: comp.tail_start_block].tolist() and moved[:n] == row[fresh : fresh + n].tolist()
    assert moved[n : comp.tail_start_block] == [-1] * (comp.tail_start_block - n)
    assert moved[comp.tail_start_block :] == row[comp.tail_start_block : fresh].tolist() + row[fresh + n :].tolist()
    assert torch.equal(copied[row[fresh : fresh + n]], in_place[row[:n]])  # the same compacted region
    no_room = _row("r", policy, 96, prompt, 0, prompt, copy=True, num_blocks=fresh)  # the scheduler had no room
    assert prefill.copies_into_fresh and not no_room.copies_into_fresh


def test_a_preempted_request_captures_its_window_afresh():
    """With a prefix-cache hit, a recomputed request does not restart at position 0: what it captured
    before preemption must go when it is preempted, not when it restarts."""
    state = WorkerState()
    state.queries.add("r", 0, 1908, torch.zeros(5, 4, DIM))
    state.queries.add("other", 0, 100, torch.zeros(2, 4, DIM))
    state.purge(finished=(), preempted=("r",))
    assert state.queries.pop("r", 0) == [] and len(state.queries.pop("other", 0)) == 1


@pytest.mark.parametrize("policy, params, reads_values",
                         [("snapkv", {}, False), ("snapkv", {"value_weight": "norm"}, True), ("vatp", {}, True)])
def test_a_compaction_gathers_the_values_only_for_a_scorer_that_declares_them(policy, params, reads_values):
    """Need.VALUES: the core hands the scorer the dense values only if its declaration asks (on a GPU the
    value gather of a long prompt is as large as the keys'), and keeps what the policy keeps from the view."""
    prompt = 400
    cache, row, k, v, gen = _cache_with_prompt(prompt, seed=11)
    query = torch.randn(prompt, HKV * GROUP, DIM, generator=gen) * 0.1 + 1.0
    gathered = []

    def spy(keys, values, *args):
        gathered.append(values is not None)
        return gather_dense(keys, values, *args)

    state = WorkerState()
    layer = LayerEviction(0, dataclasses.replace(TORCH_CPU, gather_dense=spy), DIM**-0.5, state)
    prefill = _row("r", policy, 96, prompt, 0, prompt, **params)
    plan, _, _ = plan_step(StepContext((prefill,), 1), [0, prompt], torch.tensor([prompt]), row[None].clone(), state)
    layer.before_attention(plan, query)
    compact_due(state, [(layer, cache)], 1)
    assert gathered == [reads_values]
    comp, pol = prefill.plan.compaction, prefill.plan.policy
    view = LayerView(k, v if reads_values else None, query[-32:].transpose(0, 1))
    kept = torch.stack(pol.plan_rect(view, comp.compactable_tokens, comp.kept_tokens).indices)
    got_k, _ = gather_dense(*cpu_views(cache), row, comp.kept_tokens)
    assert torch.equal(got_k, k.gather(1, kept[..., None].expand(-1, -1, DIM)))


def _locret_params(heads) -> dict:
    return {"weights": str(heads), "chunk_size": 64, "stabilizers": 16, "kernel_size": 5}


def _locret_prefill(heads, qkv: torch.Tensor, cache: torch.Tensor, row: torch.Tensor, steps: list[int]):
    """Prefill a Locret prompt in steps of the given sizes (each stopping at or before the next compaction
    point, as the scheduler does), compacting when a step reaches a point; the cache and the kept scores."""
    state = WorkerState()
    layer = LayerEviction(0, TORCH_CPU, DIM**-0.5, state)
    params = _locret_params(heads)
    done, prompt = 0, qkv.shape[0]
    for size in steps:
        info = _row("r", "locret", 64, prompt, done, size, **params)
        point = info.plan.compaction.next_point(done)
        assert point is None or done + size <= point, "a step runs past a compaction point"
        plan, _, _ = plan_step(StepContext((info,), 1), [0, size], torch.tensor([done + size]), row[None].clone(), state)
        state.qkv[0] = qkv[done : done + size]
        layer.before_attention(plan, torch.zeros(size, HKV * GROUP, DIM))
        compact_due(state, [(layer, cache)], 1)
        done += size
    assert done == prompt
    return cache, state.scores.take("r", 0)[0]


def test_locret_keeps_the_same_tokens_however_its_prefill_is_split_into_steps(tmp_path):
    """Pooling (kernel_size > 1) runs over the whole run of tokens since the last compaction point, not
    over each step's tokens: a prompt split into other steps (batching, chunked prefill) keeps the same KV."""
    from vllm_kvevict.policies.locret import HeadShape, RetainingHeads

    heads = tmp_path / "heads.pt"
    torch.manual_seed(0)
    shape = HeadShape(num_layers=1, num_heads=HKV * GROUP, num_kv_heads=HKV, head_dim=DIM, hidden=8)
    RetainingHeads(shape).save(heads)
    prompt = 700
    cache, row, _, _, gen = _cache_with_prompt(prompt, seed=5)
    qkv = torch.randn(prompt, shape.in_features, generator=gen)
    comp = _row("r", "locret", 64, prompt, 0, prompt, **_locret_params(heads)).plan.compaction
    points = [comp.point(k) for k in range(comp.last_epoch + 1)] + [prompt]
    assert len(points) >= 3  # several compactions during the prefill
    whole = [b - a for a, b in zip([0] + points, points)]  # one step per chunk
    split = [piece for size in whole for piece in (size - size // 3, size // 3) if piece]  # each in two
    got_whole, scores_whole = _locret_prefill(heads, qkv, cache.clone(), row, whole)
    got_split, scores_split = _locret_prefill(heads, qkv, cache.clone(), row, split)
    assert not torch.equal(got_whole, cache)  # it compacted
    assert torch.equal(got_whole, got_split) and torch.equal(scores_whole, scores_split)
