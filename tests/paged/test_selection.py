"""TokenSelect over the paged cache (vllm_kvevict.paged.selection): the torch twins against dense math."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.policies.soft_vote import with_fixed_windows
from vllm_kvevict.policies.tokenselect import select_candidates
from vllm_kvevict.paged.selection import paged_scores, sparse_attention, vote_topk


def paged_case(heads=3, group=3, bs=16, ctx=150, new=1, dim=16, seed=0):
    """Dense K/V [H_kv, ctx + new, D] written into a paged cache under a permuted block row."""
    g = torch.Generator().manual_seed(seed)
    total = ctx + new
    nblocks = -(-total // bs)
    num_blocks = nblocks + 7
    row = torch.randperm(num_blocks, generator=g)[:nblocks]
    dense_k = torch.randn(heads, total, dim, generator=g)
    dense_v = torch.randn(heads, total, dim, generator=g)
    keys = torch.randn(num_blocks, heads, bs, dim, generator=g)  # garbage everywhere else
    values = torch.randn(num_blocks, heads, bs, dim, generator=g)
    p = torch.arange(total)
    keys[row[p // bs], :, p % bs] = dense_k.transpose(0, 1)
    values[row[p // bs], :, p % bs] = dense_v.transpose(0, 1)
    query = torch.randn(new, heads * group, dim, generator=g)
    return keys, values, row, dense_k, dense_v, query


def test_paged_scores_equal_dense_dot_products_with_gqa():
    keys, _, row, dense_k, _, query = paged_case()
    positions = torch.arange(20, 100)
    got = paged_scores(query[0], keys, row, positions)
    want = torch.stack([query[0, h] @ dense_k[h // 3, 20:100].T for h in range(9)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_paged_selection_equals_the_policys_dense_selection():
    keys, _, row, dense_k, _, query = paged_case(ctx=300)
    n_init, n_local, k = 16, 32, 40
    positions = torch.arange(n_init, 300 - n_local)
    paged = positions[vote_topk(paged_scores(query[0], keys, row, positions), k)]
    dense = select_candidates(query[0], dense_k[:, :300], n_init, n_local, k)
    assert torch.equal(paged, dense)


def dense_attention(query, dense_k, dense_v, selected, ctx, scale):
    """Per query and head: softmax attention over selected + own causal positions, in float64."""
    num_q, num_qh, _ = query.shape
    group = num_qh // dense_k.shape[0]
    out = torch.empty(num_q, num_qh, query.shape[-1], dtype=torch.float64)
    for i in range(num_q):
        pos = torch.cat([selected, torch.arange(ctx, ctx + i + 1)])
        for h in range(num_qh):
            k, v = dense_k[h // group, pos].double(), dense_v[h // group, pos].double()
            out[i, h] = torch.softmax(k @ query[i, h].double() * scale, dim=0) @ v
    return out


@pytest.mark.parametrize("new", [1, 5])
@pytest.mark.parametrize("group", [1, 3])
def test_sparse_attention_equals_dense_attention_over_the_selection(new, group):
    keys, values, row, dense_k, dense_v, query = paged_case(group=group, new=new, ctx=200)
    selected = with_fixed_windows(torch.tensor([50, 77, 123]), 200, 8, 16)
    got = sparse_attention(query, keys, values, row, selected, 200, 0.25)
    torch.testing.assert_close(got.double(), dense_attention(query, dense_k, dense_v, selected, 200, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_sparse_attention_over_every_position_is_full_causal_attention():
    keys, values, row, dense_k, dense_v, query = paged_case(new=4, ctx=100)
    got = sparse_attention(query, keys, values, row, torch.arange(100), 100, 0.125)
    k = dense_k.repeat_interleave(3, dim=0)  # [H_q, T, D]
    v = dense_v.repeat_interleave(3, dim=0)
    q = query.transpose(0, 1)  # [H_q, 4, D]
    mask = torch.ones(4, 104, dtype=torch.bool)
    mask[:, 100:] = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pieces_cut_at_aligned_positions_and_any_late_piece_selects():
    from vllm_kvevict.policies.config import PolicyConfig

    ts = PolicyConfig.from_dict({"policy": "tokenselect", "budget": 2048}).build()  # selects past 2688
    assert ts.pieces(0, 1100) == [(0, 512), (512, 1024), (1024, 1100)]
    assert ts.pieces(700, 1024) == [(700, 1024)]
    assert ts.pieces(1947, 1948) == [(1947, 1948)]  # a decode step
    assert ts.pieces(5, 5) == []
    # an 8K first chunk starts at 0 but its pieces from 3072 on select (review finding: do not skip them)
    assert ts.selects_within(0, 8192) and not ts.selects(0)
    assert not ts.selects_within(0, 2689)  # the last piece starts at 2560 <= 2688
    assert ts.selects_within(2689, 2690)


def decode_batch(seed=0, heads=3, group=3, bs=16, dim=16, ctxs=(150, 97, 211)):
    """Several decode requests in one paged cache, each with its own permuted block row and context."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-(c + 1) // bs) for c in ctxs)
    num_blocks = width * len(ctxs) + 5
    keys = torch.randn(num_blocks, heads, bs, dim, generator=g)
    values = torch.randn(num_blocks, heads, bs, dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: width * len(ctxs)].view(len(ctxs), width)
    queries = torch.randn(len(ctxs), heads * group, dim, generator=g)
    return keys, values, tables, queries, torch.tensor(ctxs)


def test_batched_twins_equal_the_single_request_ones():
    from vllm_kvevict.paged.selection import paged_scores_batch, sparse_attention_batch, vote_topk_batch

    keys, values, tables, queries, ctxs = decode_batch()
    n_init, n_local = 8, 16
    num_cand = ctxs - n_init - n_local
    scores = paged_scores_batch(queries, keys, tables, n_init, num_cand, int(num_cand.max()))
    ks = torch.tensor([5, 9, 7])
    picks = vote_topk_batch(scores, ks)
    selected, counts = [], []
    for r, ctx in enumerate(ctxs.tolist()):
        positions = torch.arange(n_init, ctx - n_local)
        single = paged_scores(queries[r], keys, tables[r], positions)
        torch.testing.assert_close(scores[r, :, : positions.numel()], single)
        assert torch.isinf(scores[r, :, positions.numel():]).all()  # padding scores -inf
        want = vote_topk(single, int(ks[r]))
        assert torch.equal(picks[r, : ks[r]], want) and (picks[r, ks[r]:] == -1).all()
        chosen = with_fixed_windows(positions[want], ctx, n_init, n_local)
        selected.append(chosen)
        counts.append(chosen.numel())
    padded = torch.full((3, max(counts)), -1, dtype=torch.long)
    for r, chosen in enumerate(selected):
        padded[r, : chosen.numel()] = chosen
    got = sparse_attention_batch(queries[:, None][:, 0], keys, values, tables, padded, torch.tensor(counts), ctxs, 0.25)
    for r, ctx in enumerate(ctxs.tolist()):
        want = sparse_attention(queries[r : r + 1], keys, values, tables[r], selected[r], ctx, 0.25)
        torch.testing.assert_close(got[r : r + 1], want, rtol=1e-5, atol=1e-5)


def test_batched_sparse_attention_reads_each_querys_own_causal_prefix():
    """Several queries per request (query_off): query i of request r sees r's selection, then r's own
    positions up to itself, as the single-request piece does."""
    from vllm_kvevict.paged.selection import sparse_attention_batch

    keys, values, tables, _, ctxs = decode_batch()
    g = torch.Generator().manual_seed(7)
    pieces = [3, 1, 4]  # queries per request, at positions ctx .. ctx + n - 1 (all inside the table)
    ctxs = ctxs - 4
    queries = torch.randn(sum(pieces), keys.shape[1] * 2, keys.shape[-1], generator=g)
    selected = [torch.sort(torch.randperm(int(c), generator=g)[: 6 + r]).values for r, c in enumerate(ctxs.tolist())]
    padded = torch.nn.utils.rnn.pad_sequence(selected, batch_first=True, padding_value=-1)
    req = torch.repeat_interleave(torch.arange(3), torch.tensor(pieces))
    off = torch.cat([torch.arange(n) for n in pieces])
    got = sparse_attention_batch(queries, keys, values, tables, padded, torch.tensor([s.numel() for s in selected]),
                                 ctxs, 0.25, req, off)
    start = 0
    for r, n in enumerate(pieces):
        want = sparse_attention(queries[start : start + n], keys, values, tables[r], selected[r], int(ctxs[r]), 0.25)
        torch.testing.assert_close(got[start : start + n], want, rtol=1e-5, atol=1e-5)
        start += n
