"""Pieces shared by the attention kernels (Triton): the online-softmax update of one key/value tile.

Each kernel gathers its own tile of keys and values (head-lanes, or a selected index list) and folds
it into the running (max, sum, accumulator) of a GQA group of queries, in fp32. The torch twins
compute plain softmax attention, which the kernel tests compare against.
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
