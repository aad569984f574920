"""Staged token moves inside one layer's paged cache (Triton; the CUDA path). Torch twin: `compact.py`.

Compaction moves every kept token of a layer from where vLLM wrote it to where the compacted layout
wants it, inside the request's leading blocks: position j of head h (rectangular, `compact.compact`)
or a slot of the head's lanes (ragged, `lanes.pack_lanes`; addressing diagram in `lanes.py`). Sources
and destinations share those blocks, and a token's destination is often another kept token's source,
so a single in-place pass would overwrite data still to be read. Two launches per tensor make it safe
without ordering constraints:

    gather   cache[src_block, src_head, src_slot, :]  ->  staging[i, :]     (all reads)
    scatter  staging[i, :]  ->  cache[dst_block, dst_lane, dst_slot, :]     (all writes)

The staging buffer holds only the kept tokens (a few MB for a whole batch), and the addresses come
from `compact.rect_addresses` / `lanes.pack_addresses`, shared with the twins. One program copies
BLOCK_T tokens of one tensor; keys and values are any-strided [num_blocks, H_kv, bs, D] views.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from vllm_kvevict.paged.compact import Addresses, rect_addresses
from vllm_kvevict.paged.lanes import LaneMap, pack_addresses


@triton.jit
def _copy_tokens_kernel(
    src_ptr, dst_ptr, sb_ptr, sh_ptr, ss_ptr, db_ptr, dh_ptr, ds_ptr, num_tokens,
    s_b, s_h, s_s, s_d, d_b, d_h, d_s, d_d,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DIM_PAD)
    valid = i < num_tokens
    mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    sb = tl.load(sb_ptr + i, mask=valid, other=0).to(tl.int64)
    sh = tl.load(sh_ptr + i, mask=valid, other=0).to(tl.int64)
    ss = tl.load(ss_ptr + i, mask=valid, other=0).to(tl.int64)
    db = tl.load(db_ptr + i, mask=valid, other=0).to(tl.int64)
    dh = tl.load(dh_ptr + i, mask=valid, other=0).to(tl.int64)
    ds = tl.load(ds_ptr + i, mask=valid, other=0).to(tl.int64)
    x = tl.load(src_ptr + (sb * s_b + sh * s_h + ss * s_s)[:, None] + d[None, :] * s_d, mask=mask)
    tl.store(dst_ptr + (db * d_b + dh * d_h + ds * d_s)[:, None] + d[None, :] * d_d, x, mask=mask)


def copy_tokens(src: torch.Tensor, src_addr: Sequence[torch.Tensor], dst: torch.Tensor,
                dst_addr: Sequence[torch.Tensor], block_t: int = 32) -> None:
    """dst[dst_addr[0][i], dst_addr[1][i], dst_addr[2][i], :] = src[src_addr ... i, :] for every i.

    src, dst: 4-d tensors [*, *, *, D] with any strides; the address triples are int tensors of one length.
    """
    num = src_addr[0].numel()
    if num == 0:
        return
    if src.shape[-1] != dst.shape[-1]:
        raise ValueError(f"head sizes differ: {src.shape[-1]} vs {dst.shape[-1]}")
    dim = src.shape[-1]
    addr = [a.to(device=src.device, dtype=torch.int32).contiguous() for a in (*src_addr, *dst_addr)]
    _copy_tokens_kernel[(triton.cdiv(num, block_t),)](
        src, dst, *addr, num, *src.stride(), *dst.stride(),
        HEAD_DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)), BLOCK_T=block_t,
    )


def move_tokens(keys: torch.Tensor, values: torch.Tensor, src: Addresses, dst: Addresses) -> None:
    """The Triton twin of `compact.move_tokens`: keys/values[dst[i]] = old keys/values[src[i]], staged."""
    num = src[0].numel()
    if num == 0:
        return
    staged = torch.empty(2, num, 1, 1, keys.shape[-1], dtype=keys.dtype, device=keys.device)
    at = torch.arange(num, device=keys.device)
    zero = torch.zeros_like(at)
    for cache, stage in ((keys, staged[0]), (values, staged[1])):
        copy_tokens(cache, src, stage, (at, zero, zero))  # every read happens before any write
    for cache, stage in ((keys, staged[0]), (values, staged[1])):
        copy_tokens(stage, (at, zero, zero), cache, dst)


def compact(keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor, kept: torch.Tensor) -> None:
    """The Triton twin of `compact.compact` (same arguments, same result, in place)."""
    if kept.shape[0] != keys.shape[1]:
        raise ValueError(f"kept has {kept.shape[0]} heads, the cache has {keys.shape[1]}")
    move_tokens(keys, values, *rect_addresses(row, kept, keys.shape[2]))


def pack_lanes(keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor, kept: Sequence[torch.Tensor],
               lanes: LaneMap) -> None:
    """The Triton twin of `lanes.pack_lanes` (same arguments, same result, in place)."""
    if keys.shape[1] != lanes.num_heads:
        raise ValueError(f"the lane map has {lanes.num_heads} heads, the cache {keys.shape[1]}")
    move_tokens(keys, values, *pack_addresses(row, kept, lanes))
