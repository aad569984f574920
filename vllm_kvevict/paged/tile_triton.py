"""Pieces shared by the attention kernels (Triton): loading a tile of paged keys and values, and the
online-softmax update of one tile.

Each kernel works out its own tile's addresses (head-lanes, or a selected index list) and folds it into
the running (max, sum, accumulator) of a GQA group of queries, in fp32. The torch twins compute plain
softmax attention, which the kernel tests compare against.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_update(q, k, v, valid, m, l, acc, scale):
    """Fold a tile into the running softmax: q [G, D], k/v [N, D], valid [N]; m, l [G]; acc [G, D]."""
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v)
    return m_new, l, acc


@triton.jit
def load_query_group(q_ptr, qi, h, sq_n, sq_h, sq_d, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """The GQA group of KV head h for query token qi, [GROUP_PAD, DIM_PAD] fp32, zero-padded."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    return tl.load(q_ptr + qi * sq_n + (h * GROUP + g)[:, None] * sq_h + d[None, :] * sq_d,
                   mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)


@triton.jit
def empty_softmax_state(GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    """(max, sum, accumulator) before any tile: -inf, 0, 0."""
    return (tl.full([GROUP_PAD], float("-inf"), tl.float32), tl.zeros([GROUP_PAD], tl.float32),
            tl.zeros([GROUP_PAD, DIM_PAD], tl.float32))


@triton.jit
def load_kv_tile(k_ptr, v_ptr, block, head, slot, valid, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                 HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """Keys and values [N, DIM_PAD] fp32 at (block, head, slot) per row (int64 [N]); invalid rows read 0."""
    d = tl.arange(0, DIM_PAD)
    mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + (block * sk_b + head * sk_h + slot * sk_s)[:, None] + d[None, :] * sk_d, mask=mask, other=0.0)
    v = tl.load(v_ptr + (block * sv_b + head * sv_h + slot * sv_s)[:, None] + d[None, :] * sv_d, mask=mask, other=0.0)
    return k.to(tl.float32), v.to(tl.float32)
