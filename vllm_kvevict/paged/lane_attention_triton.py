"""Attention over a compacted head-lane region + the standard tail (Triton; the CUDA path).

Torch twin: `lanes.lane_attention` (also the CPU path); the addressing diagram is in
`lanes.py`. One program per (query token, KV head) handles the head's whole GQA group:

    pass 1  the head's len_h compacted tokens: token i at lane g = start_h + i // bs,
            physical (block_table[req, g // H_kv], g % H_kv, i % bs); all visible
    pass 2  the tail: token t at (block_table[req, n + t // bs], h, t % bs); visible if t <= qpos

with an online softmax in fp32. Both passes are one index space j in [0, len_h + qpos + 1) (j < len_h: a
lane token, else tail token j - len_h), which long contexts split across NUM_SPLITS programs
(flash-decoding): each split writes its partial (max, sum, accumulator) and `_combine_kernel` merges
them, so a batch of few decode queries still fills the GPU. Keys and values are [num_blocks, H_kv, bs, D] views with any strides,
so vLLM's CPU layout (keys transposed per block and head) and the CUDA flash layout
([num_blocks, bs, H_kv, D]) are both accepted without a copy. Works with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvevict.paged.tile_triton import empty_softmax_state, load_kv_tile, load_query_group, online_softmax_update


@triton.jit
def _lane_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, table_ptr, start_ptr, hlen_ptr, ncomp_ptr, qreq_ptr, qpos_ptr,
    sq_n, sq_h, sq_d, so_n, so_h, so_s, so_d,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    s_table, s_meta, scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    qi = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(qreq_ptr + qi)
    qpos = tl.load(qpos_ptr + qi)  # the query's position inside the tail
    start = tl.load(start_ptr + req * s_meta + h)
    hlen = tl.load(hlen_ptr + req * s_meta + h)
    ncomp = tl.load(ncomp_ptr + req)
    total = hlen + qpos + 1  # the tokens this query sees: the head's lanes, then the tail up to itself
    per_split = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(total, lo + per_split)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = load_query_group(q_ptr, qi, h, sq_n, sq_h, sq_d, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD)
    m, l, acc = empty_softmax_state(GROUP_PAD, DIM_PAD)
    offs = tl.arange(0, BLOCK_N)
    row = table_ptr + req * s_table

    for base in range(lo, hi, BLOCK_N):
        j = base + offs
        valid = j < hi
        in_lanes = j < hlen
        lane = start + j // BLOCK_SIZE  # lane tokens: global lane g -> (row[g // H_kv], g % H_kv)
        t = j - hlen  # tail tokens: (row[n + t // bs], h)
        col = tl.where(in_lanes, lane // NUM_KV_HEADS, ncomp + t // BLOCK_SIZE)
        block = tl.load(row + col, mask=valid, other=0).to(tl.int64)
        kv_h = tl.where(in_lanes, lane % NUM_KV_HEADS, h)
        slot = tl.where(in_lanes, j % BLOCK_SIZE, t % BLOCK_SIZE)
        k, v = load_kv_tile(k_ptr, v_ptr, block, kv_h, slot, valid, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                            HEAD_DIM, DIM_PAD)
        m, l, acc = online_softmax_update(q, k, v, valid, m, l, acc, scale)

    heads = h * GROUP + g
    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l[:, None]
        tl.store(o_ptr + qi * so_n + heads[:, None] * so_h + d[None, :] * so_d,
                 out.to(o_ptr.dtype.element_ty), mask=omask)
    else:  # partials: [Nq, H_q, S, D] accumulators and [Nq, H_q, S] max / sum (an empty split: -inf / 0)
        part = ((qi * (NUM_KV_HEADS * GROUP) + heads) * NUM_SPLITS + split).to(tl.int64)
        tl.store(o_ptr + part[:, None] * DIM_PAD + d[None, :], acc, mask=omask)
        tl.store(m_ptr + part, m, mask=gmask)
        tl.store(l_ptr + part, l, mask=gmask)


@triton.jit
def _combine_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, so_n, so_h, so_d, num_qh,
                    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_PAD: tl.constexpr):
    qi = tl.program_id(0)
    qh = tl.program_id(1)
    sp = tl.arange(0, SPLIT_PAD)
    d = tl.arange(0, DIM_PAD)
    smask = sp < NUM_SPLITS
    part = ((qi * num_qh + qh) * NUM_SPLITS + sp).to(tl.int64)
    m = tl.load(m_ptr + part, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * DIM_PAD + d[None, :], mask=smask[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # split 0 always has tokens, so the max is finite
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + qi * so_n + qh * so_h + d * so_d, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_splits(num_queries: int, num_kv_heads: int, max_tokens: int, block_n: int = 32,
                  num_sms: int = 132) -> int:
    """Splits per (query, KV head): enough programs for two waves over the SMs, each with >= 4 tiles."""
    if max_tokens <= 0:
        return 1
    want = triton.cdiv(2 * num_sms, max(1, num_queries * num_kv_heads))
    most = max(1, max_tokens // (4 * block_n))
    return int(max(1, min(want, most, 64)))


def lane_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
                   lane_start: torch.Tensor, head_len: torch.Tensor, num_compacted: torch.Tensor,
                   query_req: torch.Tensor, query_pos: torch.Tensor, scale: float, block_n: int = 32,
                   num_splits: int | None = 1, longest: int | None = None, num_sms: int = 132) -> torch.Tensor:
    """Batched lane attention.

    query [Nq, H_q, D]; keys, values [num_blocks, H_kv, bs, D] (any strides); block_table [B, max_blocks]
    (the compacted blocks first, then the tail's); lane_start, head_len [B, H_kv]; num_compacted [B];
    query_req [Nq] (its request) and query_pos [Nq] (its position in the tail). `num_splits` partitions
    each query's tokens; None lets `choose_splits` pick from `longest` (an upper bound of the tokens a
    query reads, known on the host: no device sync). Returns [Nq, H_q, D].
    """
    if num_splits is None:
        num_splits = choose_splits(query.shape[0], keys.shape[1], longest or 0, block_n, num_sms)
    num_q, num_qh, dim = query.shape
    num_kv = keys.shape[1]
    if num_qh % num_kv:
        raise ValueError(f"{num_qh} query heads are not a multiple of {num_kv} KV heads")
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    group = num_qh // num_kv
    out = torch.empty_like(query)
    if num_q == 0:
        return out
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    table, start, hlen = i32(block_table), i32(lane_start), i32(head_len)
    if start.stride(0) != hlen.stride(0):
        raise ValueError("lane_start and head_len must have the same [B, H_kv] shape")
    dim_pad = max(16, triton.next_power_of_2(dim))
    if num_splits == 1:
        target, m_buf, l_buf, o_strides = out, out, out, (out.stride(0), out.stride(1), 0, out.stride(2))
    else:
        target = torch.empty(num_q, num_qh, num_splits, dim_pad, dtype=torch.float32, device=query.device)
        m_buf = torch.empty(num_q, num_qh, num_splits, dtype=torch.float32, device=query.device)
        l_buf = torch.empty_like(m_buf)
        o_strides = target.stride()
    _lane_attention_kernel[(num_q, num_kv, num_splits)](
        query, keys, values, target, m_buf, l_buf, table, start, hlen, i32(num_compacted), i32(query_req),
        i32(query_pos), *query.stride(), *o_strides, *keys.stride(), *values.stride(),
        table.stride(0), start.stride(0), scale,
        NUM_KV_HEADS=num_kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim, DIM_PAD=dim_pad, BLOCK_SIZE=keys.shape[2], BLOCK_N=block_n, NUM_SPLITS=num_splits,
    )
    if num_splits > 1:
        _combine_kernel[(num_q, num_qh)](
            target, m_buf, l_buf, out, *out.stride(), num_qh,
            HEAD_DIM=dim, DIM_PAD=dim_pad, NUM_SPLITS=num_splits, SPLIT_PAD=triton.next_power_of_2(num_splits),
        )
    return out
