"""The numeric vectors of SPEC.md section 6, with the corrected expectations."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.policies.adakv import adakv_allocate
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.locret import HeadShape, RetainingHeads, retain_topk
from vllm_kvevict.policies.nacl import random_keep_distribution
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.soft_vote import SelectionCache, cosine, soft_vote
from vllm_kvevict.policies.tokenselect import select_candidates
from vllm_kvevict.policies.topk import topk_per_head
from vllm_kvevict.policies.vatp import value_aware_importance

# ---- 6.3 Ada-KV ----------------------------------------------------------------------------------
ADA_A = torch.tensor(
    [[0.89, 0.05, 0.01, 0.02, 0.01], [0.32, 0.22, 0.19, 0.01, 0.08], [0.68, 0.10, 0.08, 0.04, 0.09]]
)


def _retained(counts):
    kept = topk_per_head(ADA_A, counts)
    return kept, sum(float(ADA_A[h, ix].sum()) for h, ix in enumerate(kept))


def test_adakv_uniform_baseline_retains_2_26():
    _, total = _retained([2, 2, 2])
    assert total == pytest.approx(2.26)


def test_adakv_adaptive_allocation_is_global_top_b():
    counts = adakv_allocate(ADA_A, 6, floor_alpha=0.0)
    assert counts == [1, 3, 2]  # the review's (4, 1, 1) is wrong: it retains only 1.97
    kept, total = _retained(counts)
    assert [ix.tolist() for ix in kept] == [[0], [0, 1, 2], [0, 1]]
    assert total == pytest.approx(2.40)
    assert total > _retained([2, 2, 2])[1]
    assert _retained([4, 1, 1])[1] == pytest.approx(1.97)


@pytest.mark.parametrize(
    "alpha, caps, retained", [(0.2, [1, 2, 2], 2.21), (0.5, [2, 2, 2], 2.26)]
)
def test_adakv_safeguard_official_rounding(alpha, caps, retained):
    counts = adakv_allocate(ADA_A, 6, floor_alpha=alpha, mode="official")
    assert counts == caps
    assert _retained(counts)[1] == pytest.approx(retained)


def test_adakv_safeguard_exact_mode_sums_to_budget_and_respects_floor():
    counts = adakv_allocate(ADA_A, 6, floor_alpha=0.5, mode="exact")
    assert sum(counts) == 6 and min(counts) >= 1
    assert adakv_allocate(ADA_A, 6, floor_alpha=1.0, mode="exact") == [2, 2, 2]


# ---- 6.4 VATP ------------------------------------------------------------------------------------
VATP_S = torch.tensor([[0.3, 0.6, 0.2, 0.8, 0.4, 0.1, 0.7]])
VATP_VNORM = torch.tensor([1.2, 0.8, 1.5, 1.0, 0.6, 0.9, 1.4])
TOKENS = ["The", "cat", "slowly", "climbed", "up", "the", "tree"]


def _values(dim: int = 4) -> torch.Tensor:
    return (VATP_VNORM / dim).reshape(1, 7, 1).expand(1, 7, dim).clone()


def test_vatp_importance_matches_document():
    imp = value_aware_importance(VATP_S, _values())
    assert imp[0].tolist() == pytest.approx([0.36, 0.48, 0.30, 0.80, 0.24, 0.09, 0.98])


def test_vatp_keep_sets_and_contrast_with_attention_only():
    imp = value_aware_importance(VATP_S, _values())
    keep4 = {TOKENS[i] for i in topk_per_head(imp, [4])[0].tolist()}
    keep3 = {TOKENS[i] for i in topk_per_head(imp, [3])[0].tolist()}
    attn4 = {TOKENS[i] for i in topk_per_head(VATP_S, [4])[0].tolist()}
    assert keep4 == {"tree", "climbed", "cat", "The"}
    assert keep3 == {"tree", "climbed", "cat"}
    assert attn4 == {"climbed", "tree", "cat", "up"}


def test_vatp_policy_protects_the_sink():
    policy = PolicyConfig("vatp", 4, (("sink_tokens", 1), ("window", 1), ("pooling", "none"))).build()  # the paper
    keys = torch.randn(1, 7, 4)
    view = LayerView(keys, _values(), extra={"running_attention": VATP_S})
    kept = {TOKENS[i] for i in policy.plan(view).indices[0].tolist()}
    assert kept == {"tree", "climbed", "cat", "The"}


# ---- 6.5 TokenSelect -----------------------------------------------------------------------------
# rows: heads H1..H4; columns: tokens A..E (raw q.k)
TS_SCORES = torch.tensor(
    [[0.2, 0.8, 0.4, 0.7, 0.3], [0.5, 0.3, 0.6, 0.2, 0.4], [0.1, 0.6, 0.3, 0.4, 0.9], [0.4, 0.7, 0.5, 0.3, 0.2]]
)


def test_tokenselect_soft_vote_totals():
    totals = soft_vote(TS_SCORES)
    assert totals.tolist() == pytest.approx([0.6934, 0.9293, 0.7990, 0.7607, 0.8176], abs=1e-4)
    assert torch.topk(totals, 2).indices.sort().values.tolist() == [1, 4]  # {B, E}


def test_tokenselect_selection_from_real_dot_products():
    # q_h is the unit vector e_0, so q_h . k_h[t] is exactly TS_SCORES[h, t]
    query = torch.zeros(4, 4)
    query[:, 0] = 1.0
    keys = torch.zeros(4, 5, 4)
    keys[:, :, 0] = TS_SCORES
    assert select_candidates(query, keys, n_init=0, n_local=0, top_k=2).tolist() == [1, 4]
    hard_votes = torch.bincount(torch.topk(TS_SCORES, 2, dim=1).indices.reshape(-1), minlength=5)
    assert hard_votes.tolist() == [1, 3, 2, 1, 1]  # hard vote would pick {B, C}


def test_tokenselect_selection_cache_cosine():
    q1 = torch.tensor([0.1, 0.3, 0.4, 0.6])
    q2 = torch.tensor([0.1, 0.3, 0.5, 0.7])
    assert float(q1 @ q2) == pytest.approx(0.72)
    assert cosine(q1, q2) == pytest.approx(0.9977, abs=1e-4)
    for theta, hit in ((0.8, True), (0.9, True), (0.999, False)):
        cache = SelectionCache(theta)
        assert cache.lookup("r", q1) is None
        cache.store("r", q1, torch.tensor([3, 5]))
        got = cache.lookup("r", q2)
        assert (got is not None) == hit
        assert (cache.hits, cache.misses) == ((1, 1) if hit else (0, 2))


def test_tokenselect_32k_arithmetic():
    n, k = 32768, 512
    assert n * n == 1_073_741_824 and n * k == 16_777_216 and n * n // (n * k) == 64


# ---- 6.2 Locret ----------------------------------------------------------------------------------
CHUNK1 = ["The", "quick", "brown", "fox", "jumps"]
CIS1 = torch.tensor([[0.85, 0.30, 0.75, 0.90, 0.40]])
CHUNK2 = ["over", "the", "lazy", "dog", "for"]
CIS2 = torch.tensor([[0.60, 0.70, 0.50, 0.90, 0.55]])


def test_locret_chunk1_topk():
    keep = retain_topk(torch.empty(1, 0), CIS1, budget=3, stabilizers=0)[0].tolist()
    assert {CHUNK1[i] for i in keep} == {"fox", "The", "brown"}


def test_locret_chunk2_running_topk_and_stabilizer():
    keep1 = retain_topk(torch.empty(1, 0), CIS1, budget=3, stabilizers=0)[0]
    kept_tokens = [CHUNK1[i] for i in keep1.tolist()]
    kept_cis = CIS1[:, keep1]
    pool = kept_tokens + CHUNK2
    keep2 = retain_topk(kept_cis, CIS2, budget=3, stabilizers=0)[0].tolist()
    assert {pool[i] for i in keep2} == {"fox", "dog", "The"}
    chunk_only = retain_topk(torch.empty(1, 0), CIS2, budget=3, stabilizers=0)[0].tolist()
    assert {CHUNK2[i] for i in chunk_only} == {"dog", "the", "over"}
    stab = retain_topk(kept_cis, CIS2, budget=3, stabilizers=1)[0].tolist()
    assert {pool[i] for i in stab} == {"for", "fox", "dog"}


def test_locret_head_size_for_llama_3_1_8b():
    with torch.device("meta"):
        heads = RetainingHeads(HeadShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, hidden=1024))
    per_layer = sum(p.numel() for p in heads.heads[0].parameters())
    assert per_layer == 6_299_648
    assert sum(p.numel() for p in heads.parameters()) == 201_588_736


# ---- 6.1 NACL ------------------------------------------------------------------------------------
NACL_SCORES = [0.05, 0.30, 0.02, 0.25, 0.10, 0.08, 0.12, 0.03]  # tokens 1..8 (0 = sink, 9 = recent)
NACL_EXPECTED_PROBS = [0.1638, 0.1590, 0.1722, 0.1688, 0.1757, 0.1606]  # remaining tokens 1,3,5,6,7,8


def _nacl_choose(seed: int) -> list[int]:
    policy = PolicyConfig("nacl", 5, (("seed", seed), ("random_fraction", 0.34))).build()
    view = LayerView(torch.zeros(1, 10, 2), torch.zeros(1, 10, 2))
    chosen = policy.choose(torch.tensor([NACL_SCORES]), [3], view)[0]
    return (chosen + 1).tolist()  # candidate index -> token index


def test_nacl_distribution_is_softmax_of_remaining_scores():
    probs = random_keep_distribution(torch.tensor([0.05, 0.02, 0.10, 0.08, 0.12, 0.03]))
    assert probs.tolist() == pytest.approx(NACL_EXPECTED_PROBS, abs=1e-4)


def test_nacl_proxy_keep_and_random_sampling_statistics():
    remaining = [1, 3, 5, 6, 7, 8]
    counts = dict.fromkeys(remaining, 0)
    trials = 3000
    for seed in range(trials):
        kept = _nacl_choose(seed)
        assert len(kept) == 3 and {2, 4} <= set(kept)
        (r,) = set(kept) - {2, 4}
        counts[r] += 1
    # chi-square goodness of fit, 5 degrees of freedom: 20.5 is the 0.999 quantile
    chi2 = sum((counts[t] - trials * p) ** 2 / (trials * p) for t, p in zip(remaining, NACL_EXPECTED_PROBS))
    assert chi2 < 20.5, (counts, chi2)
    assert math.isclose(sum(counts.values()), trials)
