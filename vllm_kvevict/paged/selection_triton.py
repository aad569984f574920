"""TokenSelect kernels (Triton; the CUDA path). Torch twins: `selection.py` (the CPU path).

    paged_scores_batch      raw q . k of each request's query over its own contiguous candidate range,
                            keys read through its block row (grid: request x KV head x candidate tile; a
                            program scores the head's whole GQA group); -inf past a request's candidates
    soft_vote_batch         fused per-head softmax + sum over heads: one pass per (request, head) for its
                            log-sum-exp, one pass per (request, candidate tile) summing exp(s - lse) over
                            heads; `vote_topk_batch` then takes torch.topk of the totals (a k of thousands
                            over at most a few 100K candidates: torch's radix select is one fast launch)
    sparse_attention_batch  each query over its request's selected positions + the step's own positions
                            (causal), GQA, online softmax in fp32; one index space j: j < S reads
                            selected[j], else position ctx + j - S

One launch each for a whole decode batch; the single-request functions (a prefill piece) are the one-row
case. Keys and values are [num_blocks, H_kv, bs, D] views with any strides. Works with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvevict.paged import selection as twin
from vllm_kvevict.paged.tile_triton import empty_softmax_state, load_kv_tile, load_query_group, online_softmax_update
from vllm_kvevict.policies.soft_vote import vote_topk as _vote_topk


@triton.jit
def _paged_scores_kernel(q_ptr, k_ptr, table_ptr, ncand_ptr, out_ptr, first, max_cand,
                         sq_r, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, s_table, so_r, so_h, so_c,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    num_cand = tl.load(ncand_ptr + r)
    in_range = c < num_cand
    q = load_query_group(q_ptr, r, h, sq_r, sq_h, sq_d, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD)
    pos = first + c
    block = tl.load(table_ptr + r * s_table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    k, _ = load_kv_tile(k_ptr, k_ptr, block, h, pos % BLOCK_SIZE, in_range, sk_b, sk_h, sk_s, sk_d,
                        sk_b, sk_h, sk_s, sk_d, HEAD_DIM, DIM_PAD)
    s = tl.where(in_range[None, :], tl.dot(q, tl.trans(k)), float("-inf"))  # [GROUP_PAD, BLOCK_C]
    tl.store(out_ptr + r * so_r + (h * GROUP + g)[:, None] * so_h + c[None, :] * so_c, s,
             mask=gmask[:, None] & (c < max_cand)[None, :])


@triton.jit
def _head_lse_kernel(s_ptr, lse_ptr, num_cand, s_h, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for base in range(0, num_cand, BLOCK_C):
        c = base + offs
        s = tl.load(s_ptr + h * s_h + c, mask=c < num_cand, other=float("-inf"))
        m_new = tl.maximum(m, s)
        seen = m_new > float("-inf")  # a lane that has seen no candidate yet stays (-inf, 0)
        safe = tl.where(seen, m_new, 0.0)  # no -inf - -inf anywhere
        alpha = tl.where(seen, tl.exp(tl.where(seen, m, 0.0) - safe), 1.0)
        acc = acc * alpha + tl.where(seen, tl.exp(tl.where(seen, s, 0.0) - safe), 0.0)
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(acc * tl.exp(m - mx), axis=0)
    tl.store(lse_ptr + h, mx + tl.log(total))


@triton.jit
def _vote_kernel(s_ptr, lse_ptr, vote_ptr, num_cand, num_heads, s_h, BLOCK_C: tl.constexpr):
    r = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = c < num_cand
    vote = tl.zeros([BLOCK_C], tl.float32)
    for h in range(0, num_heads):
        row = r * num_heads + h
        s = tl.load(s_ptr + row * s_h + c, mask=valid, other=float("-inf"))
        vote += tl.exp(s - tl.load(lse_ptr + row))
    tl.store(vote_ptr + r * num_cand + c, vote, mask=valid)


@triton.jit
def _sparse_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, sel_ptr, nsel_ptr, ctx_ptr, qreq_ptr, qoff_ptr,
                             scale, sq_n, sq_h, sq_d, so_n, so_h, so_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                             s_table, s_sel,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    qi = tl.program_id(0)
    h = tl.program_id(1)
    req = tl.load(qreq_ptr + qi)
    num_sel = tl.load(nsel_ptr + req)
    ctx = tl.load(ctx_ptr + req)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    q = load_query_group(q_ptr, qi, h, sq_n, sq_h, sq_d, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD)
    m, l, acc = empty_softmax_state(GROUP_PAD, DIM_PAD)
    offs = tl.arange(0, BLOCK_N)
    total = num_sel + tl.load(qoff_ptr + qi) + 1  # the selected positions, then the step's own up to itself
    for base in range(0, total, BLOCK_N):
        j = base + offs
        valid = j < total
        chosen = tl.load(sel_ptr + req * s_sel + j, mask=valid & (j < num_sel), other=0)
        pos = tl.where(j < num_sel, chosen, ctx + j - num_sel)
        block = tl.load(table_ptr + req * s_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        k, v = load_kv_tile(k_ptr, v_ptr, block, h, pos % BLOCK_SIZE, valid, sk_b, sk_h, sk_s, sk_d,
                            sv_b, sv_h, sv_s, sv_d, HEAD_DIM, DIM_PAD)
        m, l, acc = online_softmax_update(q, k, v, valid, m, l, acc, scale)
    out = acc / l[:, None]
    tl.store(o_ptr + qi * so_n + (h * GROUP + g)[:, None] * so_h + d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


def _pads(num_qh: int, num_kv: int, dim: int) -> dict:
    if num_qh % num_kv:
        raise ValueError(f"{num_qh} query heads are not a multiple of {num_kv} KV heads")
    group = num_qh // num_kv
    return dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
                DIM_PAD=max(16, triton.next_power_of_2(dim)))


def _i32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int32).contiguous()


def paged_scores_batch(queries: torch.Tensor, keys: torch.Tensor, tables: torch.Tensor, first: int,
                       num_cand: torch.Tensor, max_cand: int, block_c: int = 64) -> torch.Tensor:
    """Twin of `selection.paged_scores_batch` ([R, H_q, max_cand] fp32, -inf past num_cand[r])."""
    num_rows, num_qh, dim = queries.shape
    out = torch.empty(num_rows, num_qh, max_cand, dtype=torch.float32, device=queries.device)
    if max_cand == 0 or num_rows == 0:
        return out
    table = _i32(tables, queries.device)
    _paged_scores_kernel[(num_rows, keys.shape[1], triton.cdiv(max_cand, block_c))](
        queries, keys, table, _i32(num_cand, queries.device), out, first, max_cand, *queries.stride(), *keys.stride(),
        table.stride(0), *out.stride(), **_pads(num_qh, keys.shape[1], dim), BLOCK_SIZE=keys.shape[2], BLOCK_C=block_c,
    )
    return out


def paged_scores(query: torch.Tensor, keys: torch.Tensor, row: torch.Tensor, positions: torch.Tensor,
                 block_c: int = 64) -> torch.Tensor:
    """Twin of `selection.paged_scores` for a contiguous range `positions` ([H_q, C], fp32)."""
    num_cand = positions.numel()
    first = int(positions[0]) if num_cand else 0
    if num_cand and int(positions[-1]) - first + 1 != num_cand:
        raise ValueError("paged_scores takes a contiguous candidate range [first, first + C)")
    return paged_scores_batch(query[None], keys, row[None], first, torch.tensor([num_cand]), num_cand, block_c)[0]


def soft_vote_batch(scores: torch.Tensor, block_c: int = 256) -> torch.Tensor:
    """Twin of `selection.soft_vote_batch`: [R, H, C] (-inf where padded) -> [R, C]."""
    scores = scores.float().contiguous()
    num_rows, num_heads, num_cand = scores.shape
    vote = torch.empty(num_rows, num_cand, dtype=torch.float32, device=scores.device)
    if num_cand == 0 or num_rows == 0:
        return vote
    flat = scores.view(num_rows * num_heads, num_cand)
    lse = torch.empty(num_rows * num_heads, dtype=torch.float32, device=scores.device)
    _head_lse_kernel[(num_rows * num_heads,)](flat, lse, num_cand, flat.stride(0), BLOCK_C=block_c)
    _vote_kernel[(triton.cdiv(num_cand, block_c), num_rows)](flat, lse, vote, num_cand, num_heads, flat.stride(0),
                                                              BLOCK_C=block_c)
    return vote


def soft_vote(scores: torch.Tensor, block_c: int = 256) -> torch.Tensor:
    """Twin of `vllm_kvevict.policies.soft_vote.soft_vote`: [H, C] -> [C]."""
    return soft_vote_batch(scores[None], block_c)[0]


def vote_topk(scores: torch.Tensor, k: int, pool_kernel: int = 0) -> torch.Tensor:
    """Twin of `vllm_kvevict.policies.soft_vote.vote_topk` (sorted indices into the candidates)."""
    return _vote_topk(scores, k, pool_kernel, vote_fn=soft_vote)


def vote_topk_batch(scores: torch.Tensor, k: torch.Tensor, pool_kernel: int = 0) -> torch.Tensor:
    """Twin of `selection.vote_topk_batch`, with the fused soft vote."""
    return twin.vote_topk_batch(scores, k, pool_kernel, vote_fn=soft_vote_batch)


def sparse_attention_batch(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                           selected: torch.Tensor, num_selected: torch.Tensor, ctx: torch.Tensor, scale: float,
                           query_req: torch.Tensor | None = None, query_off: torch.Tensor | None = None,
                           block_n: int = 32) -> torch.Tensor:
    """Twin of `selection.sparse_attention_batch` ([Nq, H_q, D] in the queries' dtype)."""
    num_q, num_qh, dim = queries.shape
    pads = _pads(num_qh, keys.shape[1], dim)
    out = torch.empty_like(queries)
    if num_q == 0:
        return out
    device = queries.device
    req = torch.arange(num_q, device=device) if query_req is None else query_req
    off = torch.zeros(num_q, device=device) if query_off is None else query_off
    table, sel = _i32(tables, device), _i32(selected if selected.shape[1] else selected.new_zeros(len(selected), 1), device)
    _sparse_attention_kernel[(num_q, keys.shape[1])](
        queries, keys, values, out, table, sel, _i32(num_selected, device), _i32(ctx, device), _i32(req, device),
        _i32(off, device), scale, *queries.stride(), *out.stride(), *keys.stride(), *values.stride(),
        table.stride(0), sel.stride(0), **pads, BLOCK_SIZE=keys.shape[2], BLOCK_N=block_n,
    )
    return out


def sparse_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                     selected: torch.Tensor, ctx: int, scale: float, block_n: int = 32) -> torch.Tensor:
    """Twin of `selection.sparse_attention` ([Nq, H_q, D] in the query's dtype)."""
    num_q = query.shape[0]
    device = query.device
    return sparse_attention_batch(
        query, keys, values, row[None], selected[None], torch.tensor([selected.numel()]), torch.tensor([ctx]), scale,
        torch.zeros(num_q, dtype=torch.long, device=device), torch.arange(num_q, device=device), block_n)
