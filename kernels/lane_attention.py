"""Attention over a compacted head-lane region + the standard tail (Triton; the CUDA path).

Torch twin: `vllm_kvevict.lanes.lane_attention` (also the CPU path); the addressing diagram is in
`vllm_kvevict/lanes.py`. One program per (query token, KV head) handles the head's whole GQA group:

    pass 1  the head's len_h compacted tokens: token i at lane g = start_h + i // bs,
            physical (block_table[req, g // H_kv], g % H_kv, i % bs); all visible
    pass 2  the tail: token t at (block_table[req, n + t // bs], h, t % bs); visible if t <= qpos

with an online softmax in fp32. Keys and values are [num_blocks, H_kv, bs, D] views with any strides,
so vLLM's CPU layout (keys transposed per block and head) and the CUDA flash layout
([num_blocks, bs, H_kv, D]) are both accepted without a copy. Works with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lane_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, start_ptr, hlen_ptr, ncomp_ptr, qreq_ptr, qpos_ptr,
    sq_n, sq_h, sq_d, so_n, so_h, so_d,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    s_table, s_meta, scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qi = tl.program_id(0)
    h = tl.program_id(1)
    req = tl.load(qreq_ptr + qi)
    qpos = tl.load(qpos_ptr + qi)  # the query's position inside the tail
    start = tl.load(start_ptr + req * s_meta + h)
    hlen = tl.load(hlen_ptr + req * s_meta + h)
    ncomp = tl.load(ncomp_ptr + req)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + qi * sq_n + (h * GROUP + g)[:, None] * sq_h + d[None, :] * sq_d,
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offs = tl.arange(0, BLOCK_N)

    # pass 1: the compacted lanes of head h
    for base in range(0, hlen, BLOCK_N):
        i = base + offs
        valid = i < hlen
        lane = start + i // BLOCK_SIZE
        block = tl.load(table_ptr + req * s_table + lane // NUM_KV_HEADS, mask=valid, other=0)
        kv_h = lane % NUM_KV_HEADS
        slot = i % BLOCK_SIZE
        kmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + block[:, None] * sk_b + kv_h[:, None] * sk_h + slot[:, None] * sk_s + d[None, :] * sk_d,
                    mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + block[:, None] * sv_b + kv_h[:, None] * sv_h + slot[:, None] * sv_s + d[None, :] * sv_d,
                    mask=kmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new

    # pass 2: the tail, causal
    for base in range(0, qpos + 1, BLOCK_N):
        t = base + offs
        valid = t <= qpos
        block = tl.load(table_ptr + req * s_table + ncomp + t // BLOCK_SIZE, mask=valid, other=0)
        slot = t % BLOCK_SIZE
        kmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + block[:, None] * sk_b + h * sk_h + slot[:, None] * sk_s + d[None, :] * sk_d,
                    mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + block[:, None] * sv_b + h * sv_h + slot[:, None] * sv_s + d[None, :] * sv_d,
                    mask=kmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new

    out = acc / l[:, None]
    tl.store(o_ptr + qi * so_n + (h * GROUP + g)[:, None] * so_h + d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def lane_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
                   lane_start: torch.Tensor, head_len: torch.Tensor, num_compacted: torch.Tensor,
                   query_req: torch.Tensor, query_pos: torch.Tensor, scale: float, block_n: int = 32) -> torch.Tensor:
    """Batched lane attention.

    query [Nq, H_q, D]; keys, values [num_blocks, H_kv, bs, D] (any strides); block_table [B, max_blocks]
    (the compacted blocks first, then the tail's); lane_start, head_len [B, H_kv]; num_compacted [B];
    query_req [Nq] (its request) and query_pos [Nq] (its position in the tail). Returns [Nq, H_q, D].
    """
    num_q, num_qh, dim = query.shape
    num_kv = keys.shape[1]
    if num_qh % num_kv:
        raise ValueError(f"{num_qh} query heads are not a multiple of {num_kv} KV heads")
    group = num_qh // num_kv
    out = torch.empty_like(query)
    if num_q == 0:
        return out
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    table, start, hlen = i32(block_table), i32(lane_start), i32(head_len)
    if start.stride(0) != hlen.stride(0):
        raise ValueError("lane_start and head_len must have the same [B, H_kv] shape")
    _lane_attention_kernel[(num_q, num_kv)](
        query, keys, values, out, table, start, hlen, i32(num_compacted), i32(query_req), i32(query_pos),
        *query.stride(), *out.stride(), *keys.stride(), *values.stride(),
        table.stride(0), start.stride(0), scale,
        NUM_KV_HEADS=num_kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)), BLOCK_SIZE=keys.shape[2], BLOCK_N=block_n,
    )
    return out
