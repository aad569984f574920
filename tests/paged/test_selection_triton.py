"""TokenSelect's Triton kernels against their torch twins (vllm_kvevict.paged.selection), interpreted on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.paged.conftest import DEVICE, kernel_module
from tests.paged.test_selection import paged_case
from vllm_kvevict.paged import selection as twin
from vllm_kvevict.policies.soft_vote import soft_vote as twin_vote, with_fixed_windows

TOL = 1e-5 if DEVICE == "cpu" else 2e-2  # tf32 dots on GPU


def ts():
    return kernel_module("selection_triton")


def dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("bs,dim,ctx", [(16, 16, 150), (32, 24, 333), (16, 64, 97)])
def test_paged_scores_match_twin(group, bs, dim, ctx):
    keys, _, row, _, _, query = paged_case(group=group, bs=bs, ctx=ctx, dim=dim, seed=group + bs)
    positions = torch.arange(5, ctx - 7)
    want = twin.paged_scores(query[0], keys, row, positions)
    q, k, r, p = dev(query[0], keys, row, positions)
    got = ts().paged_scores(q, k, r, p, block_c=32)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL, atol=TOL)


def test_paged_scores_refuse_a_non_contiguous_range():
    keys, _, row, _, _, query = paged_case()
    with pytest.raises(ValueError, match="contiguous candidate range"):
        ts().paged_scores(*dev(query[0], keys, row, torch.tensor([3, 5, 6])))


@pytest.mark.parametrize("heads,cand", [(9, 1), (9, 300), (4, 1000), (1, 17)])
def test_fused_soft_vote_matches_twin(heads, cand):
    scores = torch.randn(heads, cand, generator=torch.Generator().manual_seed(cand)) * 4
    torch.testing.assert_close(ts().soft_vote(scores.to(DEVICE), block_c=64).cpu(), twin_vote(scores),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 40, 500])  # 500 > candidates: every candidate
def test_vote_topk_matches_twin(k):
    scores = torch.randn(6, 257, generator=torch.Generator().manual_seed(k))
    got = ts().vote_topk(scores.to(DEVICE), k, pool_kernel=0).cpu()
    assert torch.equal(got, twin.vote_topk(scores, k))
    assert torch.equal(ts().vote_topk(scores.to(DEVICE), k, pool_kernel=5).cpu(), twin.vote_topk(scores, k, 5))


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("new,bs,dim", [(1, 16, 16), (6, 32, 24), (3, 16, 64)])
def test_sparse_attention_matches_twin(group, new, bs, dim):
    ctx = 211
    keys, values, row, _, _, query = paged_case(group=group, bs=bs, ctx=ctx, new=new, dim=dim, seed=new * 7 + dim)
    picked = torch.randperm(ctx, generator=torch.Generator().manual_seed(group))[:37]
    selected = with_fixed_windows(picked, ctx, 9, 20)
    want = twin.sparse_attention(query, keys, values, row, selected, ctx, dim**-0.5)
    got = ts().sparse_attention(*dev(query, keys, values, row, selected), ctx, dim**-0.5, block_n=16)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL, atol=TOL)


def test_sparse_attention_over_all_positions_matches_twin_on_the_cpu_layout():
    """vLLM's CPU cache view (keys transposed per block and head) is read as is."""
    from vllm_kvevict.paged.cache_layout import cpu_views

    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(10, 3, 16, 32, generator=gen)
    keys, values = cpu_views(cache)
    row = torch.tensor([7, 2, 9, 0, 4])
    query = torch.randn(2, 9, 16, generator=gen)
    want = twin.sparse_attention(query, keys, values, row, torch.arange(60), 60, 0.25)
    if DEVICE == "cpu":
        got = ts().sparse_attention(query, keys, values, row, torch.arange(60), 60, 0.25)
    else:
        got = ts().sparse_attention(*dev(query, keys.contiguous(), values, row, torch.arange(60)), 60, 0.25)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("group", [1, 3])
def test_batched_kernels_match_their_twins(group):
    from tests.paged.test_selection import decode_batch

    keys, values, tables, queries, ctxs = decode_batch(seed=group, group=group)
    num_cand = ctxs - 24
    max_cand = int(num_cand.max())
    want = twin.paged_scores_batch(queries, keys, tables, 8, num_cand, max_cand)
    got = ts().paged_scores_batch(*dev(queries, keys, tables), 8, num_cand.to(DEVICE), max_cand)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ts().soft_vote_batch(got).cpu(), twin.soft_vote_batch(want), rtol=TOL, atol=TOL)
    ks = torch.tensor([5, 9, 7])
    assert torch.equal(ts().vote_topk_batch(got, ks.to(DEVICE)).cpu(), twin.vote_topk_batch(want, ks))
    selected = torch.stack([torch.randperm(int(c), generator=torch.Generator().manual_seed(int(c)))[:40] for c in ctxs])
    counts = torch.tensor([40, 31, 40])
    a = twin.sparse_attention_batch(queries, keys, values, tables, selected, counts, ctxs, 0.3)
    b = ts().sparse_attention_batch(*dev(queries, keys, values, tables, selected, counts, ctxs), 0.3, block_n=16)
    torch.testing.assert_close(b.cpu(), a, rtol=TOL, atol=TOL)
