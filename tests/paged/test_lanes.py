"""Head-lane addressing, packing and the torch reference attention (vllm_kvevict.paged.lanes)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.paged.lanes import LaneMap, lane_attention, lane_attention_row, lane_counts, pack_lanes
from vllm_kvevict.policies.adakv import allocate_lanes


def test_allocate_lanes_is_exact_and_bounded():
    lanes = allocate_lanes([300, 20, 64], 12, 32, capacity=400)
    assert sum(lanes) == 12 and lanes[0] > lanes[2] > 0 and lanes[1] >= 1
    # a head cannot take more lanes than its candidates fill
    lanes = allocate_lanes([1000, 0, 0], 9, 32, capacity=64)
    assert lanes == [2, 2, 2]  # capped at ceil(64/32); the rest is unassignable
    # min_lanes: every head keeps at least one lane even with a zero budget
    assert min(allocate_lanes([500, 0, 0, 0], 8, 32, capacity=1000)) == 1
    # too few lanes for the floors: give back from the largest
    assert sum(allocate_lanes([10, 10, 10, 10], 2, 32, capacity=100)) == 2
    # largest remainder: 40/32 has a larger fractional part than 33/32
    assert allocate_lanes([33, 40], 3, 32, capacity=100) == [1, 2]


@pytest.mark.parametrize("lengths,bs", [([5, 0, 64, 33], 32), ([32, 32, 32], 32), ([1, 95], 16), ([0, 0, 7], 8)])
def test_lane_map_addresses_are_disjoint_and_packed(lengths, bs):
    lanes = LaneMap.build(lengths, bs)
    h = len(lengths)
    assert lanes.total_lanes == sum(math.ceil(n / bs) for n in lengths)
    assert lanes.num_blocks == math.ceil(lanes.total_lanes / h)
    seen = set()
    for head in range(h):
        r, lane, slot = lanes.addresses(head)
        assert r.numel() == lengths[head]
        for a in zip(r.tolist(), lane.tolist(), slot.tolist()):
            assert a not in seen
            seen.add(a)
        assert (r < lanes.num_blocks).all() and (lane < h).all() and (slot < bs).all()
    assert len(seen) == sum(lengths)


def _cache(num_blocks, heads, bs, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, heads, bs, dim, generator=g), torch.randn(num_blocks, heads, bs, dim, generator=g)


def _kept(lengths, region, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(region, generator=g)[:n]).values for n in lengths]


def _case(heads, bs, lengths, prompt_blocks, tail_len, seed, cpu_layout=False):
    """A request with a permuted block row: prompt_blocks full blocks, then tail blocks."""
    dim = 16
    tail_blocks = math.ceil(tail_len / bs)
    num_blocks = prompt_blocks + tail_blocks + 5
    g = torch.Generator().manual_seed(seed + 1)
    row = torch.randperm(num_blocks, generator=g)[: prompt_blocks + tail_blocks]
    if cpu_layout:  # vLLM's CPU layout: keys transposed per (block, head)
        from vllm_kvevict.paged.cache_layout import cpu_views

        cache = torch.randn(num_blocks, heads, bs, 2 * dim, generator=g)
        keys, values = cpu_views(cache)
    else:
        keys, values = _cache(num_blocks, heads, bs, dim, seed)
    kept = _kept(lengths, prompt_blocks * bs, seed)
    # what each head should see afterwards: its kept tokens, then its tail, read before packing
    expect = []
    for h, pos in enumerate(kept):
        src = row[pos // bs]
        t = torch.arange(tail_len)
        tb = row[prompt_blocks + t // bs]
        expect.append((torch.cat([keys[src, h, pos % bs], keys[tb, h, t % bs]]).clone(),
                       torch.cat([values[src, h, pos % bs], values[tb, h, t % bs]]).clone()))
    lanes = LaneMap.build(lengths, bs)
    pack_lanes(keys, values, row, kept, lanes)
    # the tail moves to right after the compacted blocks (the scheduler frees the ones in between)
    n = lanes.num_blocks
    new_row = torch.cat([row[:n], row[prompt_blocks:]])
    return keys, values, new_row, lanes, n, expect


CASES = [
    # heads, bs, lengths (ragged, a zero head, lane-boundary ends), prompt blocks, tail
    (3, 16, [5, 0, 32], 4, 7),
    (3, 16, [48, 16, 1], 4, 16),
    (4, 32, [33, 64, 0, 95], 5, 1),
    (2, 8, [8, 8], 3, 20),
    (1, 16, [17], 3, 3),
]


@pytest.mark.parametrize("heads,bs,lengths,prompt_blocks,tail", CASES)
@pytest.mark.parametrize("cpu_layout", [False, True])
def test_pack_lanes_then_gather_returns_each_heads_kept_tokens(heads, bs, lengths, prompt_blocks, tail, cpu_layout):
    from vllm_kvevict.paged.lanes import gather_head

    keys, values, row, lanes, n, expect = _case(heads, bs, lengths, prompt_blocks, tail, seed=heads * 7 + bs,
                                                cpu_layout=cpu_layout)
    assert n <= prompt_blocks
    for h in range(heads):
        k, v = gather_head(keys, values, row, lanes, h, n, tail)
        assert torch.equal(k, expect[h][0]) and torch.equal(v, expect[h][1])


def dense_reference(query, expect, lengths, tail, scale):
    """Per head: plain attention over the kept tokens gathered before packing, causal in the tail."""
    num_q, num_qh, _ = query.shape
    heads = len(lengths)
    group = num_qh // heads
    out = torch.empty(num_q, num_qh, query.shape[-1], dtype=torch.float64)
    for qi in range(num_q):
        visible_tail = tail - num_q + qi + 1
        for qh in range(num_qh):
            h = qh // group
            k, v = expect[h]
            n = lengths[h] + visible_tail
            p = torch.softmax((k[:n].double() @ query[qi, qh].double()) * scale, dim=0)
            out[qi, qh] = p @ v[:n].double()
    return out


@pytest.mark.parametrize("heads,bs,lengths,prompt_blocks,tail", CASES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("num_q", [1, 3])
def test_lane_attention_equals_dense_attention_over_kept_tokens(heads, bs, lengths, prompt_blocks, tail, group, num_q):
    num_q = min(num_q, tail)  # a chunk lies inside the tail
    keys, values, row, lanes, n, expect = _case(heads, bs, lengths, prompt_blocks, tail, seed=3)
    query = torch.randn(num_q, heads * group, keys.shape[-1], generator=torch.Generator().manual_seed(9))
    scale = keys.shape[-1] ** -0.5
    want = dense_reference(query, expect, lengths, tail, scale)
    got = lane_attention_row(query, keys, values, row, lanes, n, tail, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    batched = lane_attention(query, keys, values, row[None], torch.tensor([lanes.starts]), torch.tensor([lanes.lengths]),
                             torch.tensor([n]), torch.zeros(num_q, dtype=torch.long), torch.arange(tail - num_q, tail),
                             scale, max_queries=2)  # several query groups
    torch.testing.assert_close(batched.double(), want, rtol=1e-5, atol=1e-5)


def test_lane_counts_and_errors():
    assert lane_counts([0, 1, 16, 17], 16) == [0, 1, 1, 2]
    keys, values = _cache(4, 2, 8, 4, 0)
    with pytest.raises(ValueError, match="head 1 keeps 3 tokens, its lanes hold 2"):
        pack_lanes(keys, values, torch.arange(4), [torch.arange(2), torch.arange(3)], LaneMap.build([2, 2], 8))


def _focus_view(seed=0):
    """Head 0 attends diffusely (tiny keys), heads 1 and 2 focus on a few strongly aligned tokens."""
    from vllm_kvevict.policies.plan import LayerView

    g = torch.Generator().manual_seed(seed)
    heads, group, T, D = 3, 3, 512, 16
    queries = torch.randn(heads * group, 32, D, generator=g) * 0.1 + 1.0
    keys = torch.randn(heads, T, D, generator=g) * 0.01
    for h in (1, 2):
        keys[h, torch.randperm(T - 32, generator=g)[:3]] = 4.0  # 3 tokens take the attention mass
    return LayerView(keys=keys, values=torch.randn(heads, T, D, generator=g), queries=queries)


def test_plan_lanes_ada_gives_diffuse_heads_more_lanes_at_the_same_memory():
    from vllm_kvevict.policies.config import PolicyConfig

    view = _focus_view()
    bs, total = 32, 12  # what a uniform 128-token budget costs: 4 lanes per head
    ada = PolicyConfig.from_dict({"policy": "ada-snapkv", "budget": 128}).build()
    plan = ada.plan_lanes(view, 512, total, bs)
    lanes = lane_counts(plan.lengths, bs)
    assert sum(lanes) == total and all(n % bs == 0 for n in plan.lengths)
    assert lanes[0] > lanes[1] and lanes[0] > lanes[2] and min(lanes) >= 1
    window = set(range(480, 512))  # SnapKV's observation window is kept by every head
    assert all(window <= set(ix.tolist()) for ix in plan.indices)
    # the focused heads keep their strongly attended tokens
    for h in (1, 2):
        hot = set((view.keys[h, :, 0] > 1).nonzero().flatten().tolist())
        assert hot <= set(plan.indices[h].tolist())
    uniform = PolicyConfig.from_dict({"policy": "snapkv", "budget": 128}).build()
    plan_u = uniform.plan_lanes(view, 512, total, bs)
    assert plan_u.lengths == [128, 128, 128]
    assert [ix.tolist() for ix in plan_u.indices] == [ix.tolist() for ix in uniform.plan_rect(view, 512, 128).indices]


def test_plan_lanes_keeps_everything_when_the_lanes_cover_the_region():
    from vllm_kvevict.policies.config import PolicyConfig

    ada = PolicyConfig.from_dict({"policy": "ada-snapkv", "budget": 128}).build()
    plan = ada.plan_lanes(_focus_view(), 64, 6, 32)
    assert plan.lengths == [64, 64, 64] and plan.num_tokens == 64


def _kept_mass(scores, lanes, bs, prot):
    ordered = torch.sort(scores, dim=1, descending=True).values
    return sum(float(ordered[h, : max(0, n * bs - prot)].sum()) for h, n in enumerate(lanes))


@pytest.mark.parametrize("seed", range(6))
def test_adakv_lanes_maximise_kept_score_mass(seed):
    """Greedy over lane gains equals the brute-force best split of the lanes (3 heads, small sizes)."""
    import itertools

    from vllm_kvevict.policies.adakv import adakv_allocate_lanes

    g = torch.Generator().manual_seed(seed)
    heads, cand, bs, prot, total = 3, 40, 8, 3, 9
    scores = torch.rand(heads, cand, generator=g) ** (1 + 6 * torch.rand(heads, 1, generator=g))  # mixed spread
    lanes = adakv_allocate_lanes(scores, total, bs, prot)
    assert sum(lanes) == total and min(lanes) >= 1
    cap = math.ceil((prot + cand) / bs)
    best = max(_kept_mass(scores, split, bs, prot) for split in itertools.product(range(1, cap + 1), repeat=heads)
               if sum(split) == total)
    assert _kept_mass(scores, lanes, bs, prot) == pytest.approx(best, rel=1e-6)


def test_adakv_lanes_floor_and_edge_cases():
    from vllm_kvevict.policies.adakv import adakv_allocate_lanes

    peaked = torch.zeros(3, 64)
    peaked[0] = 1.0  # head 0 wants everything
    assert adakv_allocate_lanes(peaked, 9, 8, 0) == [7, 1, 1]
    # alpha = 1: every head gets its share first, nothing is left to adapt
    assert adakv_allocate_lanes(peaked, 9, 8, 0, floor_alpha=1.0) == [3, 3, 3]
    # fewer lanes than heads: the protected floor is taken back from the largest
    assert sum(adakv_allocate_lanes(peaked, 2, 8, 4)) == 2
    with pytest.raises(ValueError, match="floor_alpha=2"):
        adakv_allocate_lanes(peaked, 9, 8, 0, floor_alpha=2)


def test_lane_candidates_address_each_heads_lanes_then_its_tail():
    from vllm_kvevict.paged.lanes import lane_candidates

    bs, lengths, tail = 4, [8, 4, 12], 6  # 6 lanes over 3 heads: 2 compacted blocks
    lanes = LaneMap.build(lengths, bs)
    row = torch.tensor([7, 3, 9, 1, 5, 8])  # [2 compacted | tail blocks]
    (block, lane, slot), real = lane_candidates(row, torch.tensor(lanes.starts), torch.tensor(lengths), 2, tail, bs)
    assert block.shape == (3, 12 + tail)
    for h, n in enumerate(lengths):
        r, ln, sl = lanes.addresses(h)
        assert torch.equal(block[h, :n], row[r]) and torch.equal(lane[h, :n], ln) and torch.equal(slot[h, :n], sl)
        assert not real[h, n:12].any() and real[h, :n].all() and real[h, 12:].all()
        t = torch.arange(tail)
        assert torch.equal(block[h, 12:], row[2 + t // bs]) and (lane[h, 12:] == h).all()
        assert torch.equal(slot[h, 12:], t % bs)


def test_replan_lanes_scores_a_padded_view_like_each_head_alone():
    """A masked padded view scores every head as if its own tokens were the whole view (padding takes no
    attention), and each head keeps exactly its count: the window first, then its best."""
    from vllm_kvevict.policies.config import PolicyConfig
    from vllm_kvevict.policies.plan import LayerView

    g = torch.Generator().manual_seed(3)
    lengths, tail, D = [40, 16], 20, 8
    longest = max(lengths)
    keys, values = torch.randn(2, longest + tail, D, generator=g), torch.randn(2, longest + tail, D, generator=g)
    real = torch.ones(2, longest + tail, dtype=torch.bool)
    real[1, 16:longest] = False
    queries = torch.randn(4, 6, D, generator=g)  # the last 6 tail positions
    policy = PolicyConfig.from_dict({"policy": "ada-snapkv", "budget": 32, "window": 6, "pooling": "none"}).build()
    padded = policy.score(LayerView(keys, values, queries, key_mask=real))
    for h in range(2):
        own = real[h].nonzero().flatten()
        alone = policy.score(LayerView(keys[h : h + 1, own], values[h : h + 1, own], queries[2 * h : 2 * h + 2]))
        torch.testing.assert_close(padded[h, own], alone[0])
        assert float(padded[h, ~real[h]].abs().sum()) == 0.0
    region = longest + tail - 4  # the last 4 positions stay in the tail
    plan = policy.replan_lanes(LayerView(keys, values, queries, key_mask=real), region, lengths)
    assert plan.lengths == lengths
    for h in range(2):
        kept = set(plan.indices[h].tolist())
        assert set(range(region - 2, region)) <= kept  # the window's part inside the region
        assert all(real[h, p] and p < region for p in kept)
        rest = [p for p in real[h].nonzero().flatten().tolist() if p < region - 2 and p not in kept]
        worst_kept = min(float(padded[h, p]) for p in kept if p < region - 2)
        assert all(float(padded[h, p]) <= worst_kept for p in rest)
    with pytest.raises(ValueError, match="exceed"):
        policy.replan_lanes(LayerView(keys, values, queries, key_mask=real), 20, [40, 16])
