"""Properties of every eviction policy's plan over random shapes and budgets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_kvevict.policies.adakv import adakv_allocate
from vllm_kvevict.policies.attention import pool_scores, share_ranks, window_attention
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.declaration import Need
from vllm_kvevict.policies.gqa import reduce_groups
from vllm_kvevict.policies.budget import resolve_budget
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.pyramid import pyramid_budgets
from vllm_kvevict.policies.registry import names
from vllm_kvevict.policies.topk import candidate_positions, merge_kept, protected_positions, topk_per_head
from vllm_kvevict.policies.uniform import uniform_allocate

# every evicting policy that plans from a dense view (those scoring pre-RoPE q/k/v have their own tests)
EVICT = [n for n in names("evict") if Need.PRE_ROPE_QKV not in PolicyConfig(n).build().declaration.needs]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_view(policy, num_kv: int, group: int, num_tokens: int, layer: int, num_layers: int, seed: int):
    """A random dense view with what the policy declares: no values unless Need.VALUES (as the core builds it),
    so a scorer that reads values without declaring them fails here."""
    gen = torch.Generator().manual_seed(seed)
    dim = 8
    keys = torch.randn(num_kv, num_tokens, dim, generator=gen)
    values = torch.randn(num_kv, num_tokens, dim, generator=gen)
    window = policy.query_window(num_tokens)
    queries = torch.randn(num_kv * group, window, dim, generator=gen) if window else None
    scored_values = values if Need.VALUES in policy.declaration.needs else None
    return LayerView(keys, scored_values, queries, layer=layer, num_layers=num_layers)


budgets = st.one_of(st.integers(1, 400), st.floats(0.01, 1.0))


@pytest.mark.parametrize("name", EVICT)
@SETTINGS
@given(
    num_kv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 3, 4]), num_tokens=st.integers(1, 300),
    budget=budgets, layer=st.integers(0, 5), seed=st.integers(0, 10_000),
)
def test_plan_invariants(name, num_kv, group, num_tokens, budget, layer, seed):
    policy = PolicyConfig(name, budget).build()
    view = make_view(policy, num_kv, group, num_tokens, layer, 6, seed)
    plan = policy.plan(view)
    recent = policy.recent_tokens(num_tokens)
    protected = set(protected_positions(num_tokens, policy.sink_tokens, recent).tolist())
    per_head = policy.tokens_per_head(num_tokens, layer, 6)
    assert len(plan.indices) == num_kv
    for ix in plan.indices:
        values = ix.tolist()
        assert values == sorted(set(values)), "indices must be sorted and unique"
        assert all(0 <= v < num_tokens for v in values)
        assert protected <= set(values), "protected sinks and recent window must survive"
    if policy.allocator == "uniform":
        assert plan.lengths == [per_head] * num_kv
    else:  # ragged heads, but the layer keeps exactly the uniform total
        assert plan.total == per_head * num_kv
    if resolve_budget(budget, num_tokens) >= num_tokens:
        assert plan.is_noop


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "vatp", "pyramidkv"])
@SETTINGS
@given(num_tokens=st.integers(40, 300), budget=st.integers(33, 200), seed=st.integers(0, 10_000))
def test_kept_tokens_are_the_top_scored(name, num_tokens, budget, seed):
    policy = PolicyConfig(name, budget).build()
    view = make_view(policy, 3, 3, num_tokens, 2, 6, seed)
    scores = policy.score(view)
    plan = policy.plan(view)
    cand = candidate_positions(num_tokens, policy.sink_tokens, policy.recent_tokens(num_tokens))
    for h, ix in enumerate(plan.indices):
        kept = torch.zeros(num_tokens, dtype=torch.bool)
        kept[ix] = True
        kept_c, dropped_c = scores[h, cand][kept[cand]], scores[h, cand][~kept[cand]]
        if kept_c.numel() and dropped_c.numel():
            assert kept_c.min() >= dropped_c.max()


@SETTINGS
@given(
    num_heads=st.integers(1, 8), num_cand=st.integers(0, 60), frac=st.floats(0, 1),
    alpha=st.floats(0, 1), seed=st.integers(0, 1000),
)
def test_allocators_sum_to_the_total(num_heads, num_cand, frac, alpha, seed):
    total = int(frac * num_heads * num_cand)
    scores = torch.rand(num_heads, num_cand, generator=torch.Generator().manual_seed(seed))
    ada = adakv_allocate(scores, total, floor_alpha=alpha)
    assert sum(ada) == total and all(0 <= c <= num_cand for c in ada)
    assert min(ada, default=0) >= min(int((total // num_heads) * alpha), num_cand)
    uni = uniform_allocate(num_heads, total, max(num_cand, 1))
    assert sum(uni) == total and max(uni) - min(uni) <= 1


@SETTINGS
@given(base=st.integers(1, 500), layers=st.integers(2, 40), beta=st.floats(1.5, 50), slack=st.integers(0, 1000))
def test_pyramid_keeps_the_mean_and_decreases(base, layers, beta, slack):
    capacity = base + slack
    out = pyramid_budgets(base, layers, beta, capacity)
    assert sum(out) == base * layers
    assert all(0 <= x <= capacity for x in out)
    assert all(a >= b - 1 for a, b in zip(out, out[1:])), "non-increasing up to rounding"


def test_gqa_reduction_matches_hand_computation():
    scores = torch.arange(24, dtype=torch.float32).reshape(6, 4)  # 6 query heads, 2 KV heads: g = 3
    expected_mean = torch.stack([scores[0:3].mean(0), scores[3:6].mean(0)])
    expected_max = torch.stack([scores[0:3].max(0).values, scores[3:6].max(0).values])
    assert torch.equal(reduce_groups(scores, 2, "mean"), expected_mean)
    assert torch.equal(reduce_groups(scores, 2, "max"), expected_max)
    with pytest.raises(ValueError, match="multiple"):
        reduce_groups(scores, 4)


@pytest.mark.parametrize("window_reduce", ["mean", "max"])
def test_snapkv_score_matches_a_loop_over_query_heads(window_reduce):
    gen = torch.Generator().manual_seed(0)
    num_kv, group, num_tokens, window, dim = 2, 3, 50, 8, 16
    keys = torch.randn(num_kv, num_tokens, dim, generator=gen)
    queries = torch.randn(num_kv * group, window, dim, generator=gen)
    policy = PolicyConfig("snapkv", 20, (("window", window), ("window_reduce", window_reduce))).build()
    got = policy.score(LayerView(keys, torch.randn_like(keys), queries))
    for kv in range(num_kv):
        per_q = []
        for qh in range(kv * group, (kv + 1) * group):
            logits = queries[qh] @ keys[kv].T / dim**0.5
            for i in range(window):  # query i sits at position T - W + i and sees keys <= it
                logits[i, num_tokens - window + i + 1 :] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            if window_reduce == "mean":
                agg = probs.mean(0)
            else:  # the most any query gives a token, floored at that maximum's mean before the window
                worst = probs.max(0).values
                agg = worst.clamp(min=float(worst[: num_tokens - window].mean()))
            head = pool_scores(agg[: num_tokens - window].unsqueeze(0), policy.kernel_size, "max", policy.pool_align)[0]
            per_q.append(torch.cat([head, agg[num_tokens - window :]]))
        assert torch.allclose(got[kv], torch.stack(per_q).mean(0), atol=1e-6)
    probs = window_attention(queries, keys)
    assert torch.allclose(probs.sum(-1), torch.ones(num_kv * group, window))


def test_same_seed_same_plan_and_seeds_differ():
    def plan(seed):
        policy = PolicyConfig("nacl", 60, (("seed", seed),)).build()
        return policy.plan(make_view(policy, 3, 3, 400, 1, 4, seed=7))

    a, b, c = plan(1), plan(1), plan(2)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not all(torch.equal(x, y) for x, y in zip(a.indices, c.indices))
    # heads draw different random samples (head-wise diversity)
    assert not torch.equal(a.indices[0], a.indices[1])


def test_budget_resolution():
    assert resolve_budget(256, 2000) == 256
    assert resolve_budget(0.125, 2000) == 250
    assert resolve_budget(4096, 2000) == 2000
    assert resolve_budget(1.0, 7) == 7


def test_min_prompt_len_skips_short_prompts():
    policy = PolicyConfig("snapkv", 40, (("min_prompt_len", 100),)).build()
    assert policy.plan(make_view(policy, 3, 3, 100, 0, 1, 0)).is_noop
    assert not policy.plan(make_view(policy, 3, 3, 101, 0, 1, 0)).is_noop


def test_streamingllm_recompaction_keeps_sinks_and_the_latest_tokens_of_the_region():
    """During decode (decode_interval) the region is [kept | grown tail]; StreamingLLM keeps its sinks
    and then the most recent tokens of the region, not arbitrary ones."""
    policy = PolicyConfig.from_dict({"policy": "streamingllm", "budget": 64, "decode_interval": 128}).build()
    assert policy.declaration.decode_interval == 128
    view = make_view(policy, 2, 2, 300, 0, 1, 0)
    plan = policy.plan_rect(view, region=256, keep=64)
    want = list(range(4)) + list(range(256 - 60, 256))
    assert [ix.tolist() for ix in plan.indices] == [want, want]


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_follow_pooling_lifts_the_tokens_after_a_hit_and_centre_pooling_both_sides(pooling):
    scores = torch.zeros(2, 12)
    scores[0, 4] = 1.0
    scores[1, 0] = 3.0
    follow = pool_scores(scores, 4, pooling, "follow")
    centre = pool_scores(scores, 5, pooling, "center")
    assert follow.shape == centre.shape == scores.shape
    assert follow[0].nonzero().flatten().tolist() == [4, 5, 6, 7]  # the hit and the 3 tokens after it
    assert centre[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    naive = torch.stack([scores[:, max(0, j - 3) : j + 1].max(1).values if pooling == "max"
                         else scores[:, max(0, j - 3) : j + 1].mean(1) for j in range(12)], dim=1)
    torch.testing.assert_close(follow, naive)  # window [j - k + 1, j], edges averaged over what exists
    with pytest.raises(ValueError, match="pool_align='left' is invalid"):
        pool_scores(scores, 4, pooling, "left")


def test_a_policy_variant_names_its_fields_and_fails_clearly():
    from vllm_kvevict.eval.engine import check_policies, policy_args, split_variant

    assert split_variant("snapkv") == ("snapkv", {})
    assert split_variant("snapkv:pool_align=follow:kernel_size=9") == ("snapkv", {"pool_align": "follow", "kernel_size": "9"})
    assert policy_args("ada-snapkv:pool_align=follow", 0.125) == {
        "kv_policy": "ada-snapkv", "kv_budget": 0.125, "kv_pool_align": "follow"}
    check_policies(["snapkv:pool_align=follow"], [256])
    with pytest.raises(ValueError, match="'kernel_size' is not FIELD=VALUE"):
        split_variant("snapkv:kernel_size")
    with pytest.raises(ValueError, match="pool_align='left' is invalid"):
        check_policies(["snapkv:pool_align=left"], [256])
    with pytest.raises(ValueError, match="unknown key 'kernel_sz'"):
        check_policies(["snapkv:kernel_sz=3"], [256])


def test_value_weighting_prefers_the_token_whose_value_moves_the_output():
    """Two tokens take the same window attention; value_weight=norm keeps the one with the larger value."""
    from vllm_kvevict.policies.config import PolicyConfig
    from vllm_kvevict.policies.plan import LayerView

    g = torch.Generator().manual_seed(0)
    T, D = 64, 8
    keys = torch.randn(1, T, D, generator=g) * 0.01
    keys[0, 10] = keys[0, 20] = 3.0  # equal attention from every window query
    values = torch.randn(1, T, D, generator=g)
    values[0, 10] *= 0.01
    values[0, 20] = values[0, 20] / values[0, 20].norm() * 5
    queries = torch.ones(2, 4, D)
    view = LayerView(keys, values, queries)
    args = {"policy": "snapkv", "budget": 5, "window": 4, "pooling": "none"}
    plain = PolicyConfig.from_dict(args).build().score(view)
    weighted = PolicyConfig.from_dict({**args, "value_weight": "norm"}).build().score(view)
    torch.testing.assert_close(plain[0, 10], plain[0, 20])
    assert weighted[0, 20] > 100 * weighted[0, 10]
    for value_weight, best in (("none", 10), ("norm", 20)):  # one slot: a tie goes to the earlier token
        policy = PolicyConfig.from_dict({**args, "value_weight": value_weight}).build()
        assert policy.plan_rect(view, 60, 1).indices[0].tolist() == [best]


@pytest.mark.parametrize("name", ["vatp", "nacl"])
def test_pooling_option_lifts_what_follows_a_hit_and_leaves_the_recent_tokens_alone(name):
    """VATP and NACL unpooled (`pooling: none`, their papers) score a hit alone; `pooling: max` + `follow` lifts the k - 1
    tokens after the one their queries attend to, as SnapKV's scores do, and never the kept recent tokens."""
    num_tokens, dim, hit = 64, 8, 20
    keys = torch.zeros(1, num_tokens, dim)
    keys[0, hit, 0] = 40.0  # every query attends (almost only) to the hit
    values = torch.ones(1, num_tokens, dim)
    plain = PolicyConfig(name, 8, (("pooling", "none"),)).build()
    pooled = PolicyConfig(name, 8, (("pooling", "max"), ("kernel_size", 5), ("pool_align", "follow"),
                                    ("pool_share", 1.0))).build()
    recent = plain.recent_tokens(num_tokens)
    queries = torch.zeros(1, plain.query_window(num_tokens), dim)
    queries[..., 0] = 1.0
    view = LayerView(keys, values, queries, layer=0, num_layers=1)
    base, lifted = plain.score(view)[0], pooled.score(view)[0]
    assert base.argmax().item() == hit and base[hit + 1] < base[hit] / 100  # unpooled: the hit stands alone
    torch.testing.assert_close(lifted[hit : hit + 5], base[hit].expand(5))  # the hit and the 4 tokens after it
    assert lifted[hit + 5] < base[hit] / 100 and lifted[hit - 1] < base[hit] / 100
    torch.testing.assert_close(lifted[num_tokens - recent :], base[num_tokens - recent :])


def test_vatp_keeps_half_its_slots_for_the_span_after_a_hit_and_half_for_the_papers_picks():
    """VATP's default (`pool_share: 0.5`): the pooled half keeps what follows the strongest hit (the rest of a
    number), the other half the tokens its unpooled score ranks first, as the paper keeps them."""
    num_tokens, dim, hit, others = 96, 8, 20, [35, 42, 49, 56]
    keys = torch.zeros(1, num_tokens, dim)
    keys[0, hit, 0] = 12.0
    keys[0, others, 0] = torch.tensor([9.0, 8.5, 8.0, 7.5])  # weaker hits, each alone
    values = torch.ones(1, num_tokens, dim)
    policy = PolicyConfig("vatp", 64).build()
    assert policy.pool_share == 0.5
    queries = torch.zeros(1, policy.query_window(num_tokens), dim)
    queries[..., 0] = 1.0
    view = LayerView(keys, values, queries, layer=0, num_layers=1)
    protected, candidates = policy._region_positions(num_tokens, num_tokens - 32)
    kept = set(policy.plan_rect(view, num_tokens - 32, protected.numel() + 10).indices[0].tolist())
    assert set(range(hit, hit + 5)) <= kept  # the pooled half: the hit and what follows it
    assert set(others) <= kept  # the unpooled half: the paper's next picks
    only_pooled = PolicyConfig("vatp", 64, (("pool_share", 1.0),)).build()
    kept = set(only_pooled.plan_rect(view, num_tokens - 32, protected.numel() + 10).indices[0].tolist())
    assert set(range(hit, hit + 10)) <= kept and not set(others) & kept


@SETTINGS
@given(num_heads=st.integers(1, 4), num_tokens=st.integers(1, 60), data=st.data())
def test_batched_top_k_picks_what_one_sort_per_head_picks(num_heads, num_tokens, data):
    """`topk_per_head` sorts every head at once: the same picks as a stable sort per head, ties (few distinct
    scores) to the earlier position, equal and ragged counts alike; `merge_kept` adds the protected ones."""
    scores = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=num_tokens, max_size=num_tokens),
                                             min_size=num_heads, max_size=num_heads)), dtype=torch.float32)
    counts = data.draw(st.one_of(st.integers(0, num_tokens + 2).map(lambda k: [k] * num_heads),
                                 st.lists(st.integers(0, num_tokens + 2), min_size=num_heads, max_size=num_heads)))
    got = topk_per_head(scores, counts)
    for h, k in enumerate(counts):
        ranked = sorted(range(num_tokens), key=lambda j: (-float(scores[h, j]), j))
        assert got[h].tolist() == sorted(ranked[:k])
    protected = torch.tensor([0, num_tokens + 1])
    candidates = torch.arange(1, num_tokens + 1)
    for merged, picked in zip(merge_kept(protected, candidates, got), got):
        assert merged.tolist() == sorted([0, num_tokens + 1] + (picked + 1).tolist())


@SETTINGS
@given(num_tokens=st.integers(2, 80), share=st.sampled_from([0.0, 0.25, 0.5, 0.8]), seed=st.integers(0, 10_000),
       data=st.data())
def test_a_pool_share_keeps_the_top_of_both_orders_in_proportion(num_tokens, share, seed, data):
    """`share_ranks`: top-k = the k tokens of least min(rank by pooled / share, rank by raw / (1 - share)),
    ties to the earlier position, so it holds the pooled order's top ~share*k and the raw order's top
    ~(1 - share)*k; share 0 is the raw order's top-k."""
    gen = torch.Generator().manual_seed(seed)
    pooled = torch.randint(0, 6, (2, num_tokens), generator=gen).float()  # plateaus, as max pooling makes
    raw = torch.rand(2, num_tokens, generator=gen)
    k = data.draw(st.integers(1, num_tokens))
    got = topk_per_head(share_ranks(pooled, raw, share), [k, k])
    for h in range(2):
        rank_p = {j: r for r, j in enumerate(sorted(range(num_tokens), key=lambda j: (-float(pooled[h, j]), j)))}
        rank_r = {j: r for r, j in enumerate(sorted(range(num_tokens), key=lambda j: (-float(raw[h, j]), j)))}
        key = {j: min(rank_p[j] / share if share else float("inf"), rank_r[j] / (1 - share)) for j in range(num_tokens)}
        want = sorted(sorted(range(num_tokens), key=lambda j: (key[j], j))[:k])
        assert got[h].tolist() == want
        assert sum(rank_p[j] < int(share * k) for j in want) == int(share * k)  # the pooled top share*k is in
    assert torch.equal(share_ranks(pooled, raw, 1.0), pooled)
    with pytest.raises(ValueError, match="pool_share=1.5"):
        share_ranks(pooled, raw, 1.5)


def test_defensive_window_reduce_keeps_the_token_one_query_needs():
    """`window_reduce: max` (DefensiveKV): a token that one window query reads strongly outranks one every
    query reads a little, which the mean (SnapKV) prefers; tokens before the window whose worst case is below
    its mean tie at that mean."""
    num_tokens, dim, broad, sharp = 64, 8, 10, 30
    keys = torch.zeros(1, num_tokens, dim)
    keys[0, broad, 0] = 1.0
    keys[0, sharp, 1] = 1.0
    queries = torch.zeros(1, 4, dim)
    queries[0, :3, 0] = 8.0  # three queries read `broad` a little (softmax over ~64 near-equal keys)
    queries[0, 3, 1] = 11.0  # the last reads `sharp` about half the time
    view = LayerView(keys, None, queries)
    args = {"policy": "snapkv", "budget": 5, "window": 4, "pooling": "none"}
    mean = PolicyConfig.from_dict({**args, "window_reduce": "mean"}).build()
    worst = PolicyConfig.from_dict({**args, "window_reduce": "max"}).build()
    mean_scores, worst_scores = mean.score(view)[0], worst.score(view)[0]
    assert mean_scores[broad] > mean_scores[sharp]
    assert worst_scores[sharp] > worst_scores[broad]
    assert mean.plan_rect(view, 60, 1).indices[0].tolist() == [broad]
    assert worst.plan_rect(view, 60, 1).indices[0].tolist() == [sharp]
    floor = worst_scores[: num_tokens - 4].min()
    below = [t for t in range(num_tokens - 4) if t not in (broad, sharp)]
    torch.testing.assert_close(worst_scores[below], floor.expand(len(below)))
    probs = window_attention(queries, keys)
    torch.testing.assert_close(floor, probs.amax(dim=1)[0, : num_tokens - 4].mean())

