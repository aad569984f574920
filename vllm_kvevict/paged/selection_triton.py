"""TokenSelect kernels (Triton; the CUDA path). Torch twins: `selection.py` (the CPU path).

    paged_scores      raw q . k over a contiguous candidate range, keys read through the block row
                      (grid: KV head x candidate tile; a program scores the head's whole GQA group)
    soft_vote         fused per-head softmax + sum over heads: one pass for each head's log-sum-exp,
                      one pass summing exp(s - lse) over heads per candidate tile; `vote_topk` then
                      takes torch.topk of the totals (a k of thousands over at most a few 100K
                      candidates: torch's radix select is already a single fast launch)
    sparse_attention  queries over a list of selected cached positions + this step's own positions
                      (causal), GQA, online softmax in fp32; one index space j: j < S reads selected[j],
                      else position ctx + j - S

Keys and values are [num_blocks, H_kv, bs, D] views with any strides. One request per call (the
backend loops over the batch's selecting rows). Works with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvevict.paged.tile_triton import empty_softmax_state, load_query_group, online_softmax_update

from vllm_kvevict.policies.soft_vote import vote_topk as _vote_topk


@triton.jit
def _paged_scores_kernel(q_ptr, k_ptr, row_ptr, out_ptr, first, num_cand,
                         sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, so_h, so_c,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    valid = c < num_cand
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (h * GROUP + g)[:, None] * sq_h + d[None, :] * sq_d,
                mask=(g < GROUP)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    pos = first + c
    block = tl.load(row_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    k = tl.load(k_ptr + (block * sk_b + h * sk_h + (pos % BLOCK_SIZE) * sk_s)[:, None] + d[None, :] * sk_d,
                mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k))  # [GROUP_PAD, BLOCK_C]
    tl.store(out_ptr + (h * GROUP + g)[:, None] * so_h + c[None, :] * so_c, s,
             mask=(g < GROUP)[:, None] & valid[None, :])


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
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = c < num_cand
    vote = tl.zeros([BLOCK_C], tl.float32)
    for h in range(0, num_heads):
        s = tl.load(s_ptr + h * s_h + c, mask=valid, other=float("-inf"))
        vote += tl.exp(s - tl.load(lse_ptr + h))
    tl.store(vote_ptr + c, vote, mask=valid)


@triton.jit
def _sparse_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, row_ptr, sel_ptr, num_sel, ctx, scale,
                             sq_n, sq_h, sq_d, so_n, so_h, so_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    qi = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = load_query_group(q_ptr, qi, h, sq_n, sq_h, sq_d, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD)
    m, l, acc = empty_softmax_state(GROUP_PAD, DIM_PAD)
    offs = tl.arange(0, BLOCK_N)
    total = num_sel + qi + 1  # the selected positions, then this step's tokens up to the query itself
    for base in range(0, total, BLOCK_N):
        j = base + offs
        valid = j < total
        chosen = tl.load(sel_ptr + j, mask=valid & (j < num_sel), other=0)
        pos = tl.where(j < num_sel, chosen, ctx + j - num_sel)
        block = tl.load(row_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (block * sk_b + h * sk_h + slot * sk_s)[:, None] + d[None, :] * sk_d,
                    mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (block * sv_b + h * sv_h + slot * sv_s)[:, None] + d[None, :] * sv_d,
                    mask=kmask, other=0.0).to(tl.float32)
        m, l, acc = online_softmax_update(q, k, v, valid, m, l, acc, scale)
    out = acc / l[:, None]
    tl.store(o_ptr + qi * so_n + (h * GROUP + g)[:, None] * so_h + d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def _pads(num_qh: int, num_kv: int, dim: int) -> dict:
    if num_qh % num_kv:
        raise ValueError(f"{num_qh} query heads are not a multiple of {num_kv} KV heads")
    group = num_qh // num_kv
    return dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
                DIM_PAD=max(16, triton.next_power_of_2(dim)))


def paged_scores(query: torch.Tensor, keys: torch.Tensor, row: torch.Tensor, positions: torch.Tensor,
                 block_c: int = 64) -> torch.Tensor:
    """Twin of `selection.paged_scores` for a contiguous range `positions` ([H_q, C], fp32)."""
    num_cand = positions.numel()
    first = int(positions[0]) if num_cand else 0
    if num_cand and int(positions[-1]) - first + 1 != num_cand:
        raise ValueError("paged_scores takes a contiguous candidate range [first, first + C)")
    out = torch.empty(query.shape[0], num_cand, dtype=torch.float32, device=query.device)
    if num_cand == 0:
        return out
    row = row.to(device=query.device, dtype=torch.int32).contiguous()
    _paged_scores_kernel[(keys.shape[1], triton.cdiv(num_cand, block_c))](
        query, keys, row, out, first, num_cand, *query.stride(), *keys.stride(), *out.stride(),
        **_pads(query.shape[0], keys.shape[1], query.shape[1]), BLOCK_SIZE=keys.shape[2], BLOCK_C=block_c,
    )
    return out


def soft_vote(scores: torch.Tensor, block_c: int = 256) -> torch.Tensor:
    """Twin of `vllm_kvevict.policies.soft_vote.soft_vote`: [H, C] -> [C]."""
    scores = scores.float().contiguous()
    num_heads, num_cand = scores.shape
    vote = torch.empty(num_cand, dtype=torch.float32, device=scores.device)
    if num_cand == 0:
        return vote
    lse = torch.empty(num_heads, dtype=torch.float32, device=scores.device)
    _head_lse_kernel[(num_heads,)](scores, lse, num_cand, scores.stride(0), BLOCK_C=block_c)
    _vote_kernel[(triton.cdiv(num_cand, block_c),)](scores, lse, vote, num_cand, num_heads, scores.stride(0),
                                                    BLOCK_C=block_c)
    return vote


def vote_topk(scores: torch.Tensor, k: int, pool_kernel: int = 0) -> torch.Tensor:
    """Twin of `vllm_kvevict.policies.soft_vote.vote_topk` (sorted indices into the candidates)."""
    return _vote_topk(scores, k, pool_kernel, vote_fn=soft_vote)


def sparse_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                     selected: torch.Tensor, ctx: int, scale: float, block_n: int = 32) -> torch.Tensor:
    """Twin of `selection.sparse_attention` ([Nq, H_q, D] in the query's dtype)."""
    num_q, num_qh, dim = query.shape
    pads = _pads(num_qh, keys.shape[1], dim)
    out = torch.empty_like(query)
    if num_q == 0:
        return out
    row = row.to(device=query.device, dtype=torch.int32).contiguous()
    sel = selected.to(device=query.device, dtype=torch.int32).contiguous()
    _sparse_attention_kernel[(num_q, keys.shape[1])](
        query, keys, values, out, row, sel, sel.numel(), ctx, scale,
        *query.stride(), *out.stride(), *keys.stride(), *values.stride(),
        **pads, BLOCK_SIZE=keys.shape[2], BLOCK_N=block_n,
    )
    return out
