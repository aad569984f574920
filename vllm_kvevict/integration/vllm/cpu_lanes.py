"""Lane attention on CPU_ATTN through vLLM's own CPU attention kernel (the CPU path's fast route).

`paged.lanes.lane_sequences` restates attention over ragged head-lanes + tail as ordinary paged
attention, one sequence per (row, KV head), over a *lane view* of the layer cache:

    CPU_ATTN layer cache   [nb, H_kv, bs, 2*D], read by vLLM as [nb, H_kv, 2*bs, D] (K rows, then V rows)
    lane view              [nb*H_kv, 1, 2*bs, D]: every (block, head) slice is a one-head block

so `ops.cpu_attention_with_kv_cache` reads the lanes in place (no gathered copy of K/V, which is what
bounds the torch twin). Where the view or the sequences do not apply (a head with a partial lane, or
a cache that is not CPU_ATTN's contiguous layout) the torch twin `lanes.lane_attention` runs instead.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from vllm import _custom_ops as ops

from vllm_kvevict.core.adapter import TORCH_CPU, CacheAdapter
from vllm_kvevict.paged.lanes import lane_sequences


def _lane_view(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(key_cache, value_cache) [nb*H_kv, 1, bs, D] over the same memory, as vLLM slices its own; None
    when `keys`/`values` are not `cache_layout.cpu_views` of a contiguous CPU_ATTN cache."""
    num_blocks, num_kv, block_size, dim = keys.shape
    lane = 2 * block_size * dim
    if (keys.stride() != (num_kv * lane, lane, 1, block_size)
            or values.stride() != (num_kv * lane, lane, dim, 1)
            or values.storage_offset() - keys.storage_offset() != block_size * dim):
        return None
    size, stride = (num_blocks * num_kv, 1, block_size, dim), (lane, lane, dim, 1)
    return (torch.as_strided(keys, size, stride, keys.storage_offset()),
            torch.as_strided(values, size, stride, values.storage_offset()))


def vllm_lane_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lanes, layer: int,
                        scale: float, *, isa: str) -> torch.Tensor:
    """The adapter's lane attention ([Nq, H_q, D] for the lane rows' queries), run by vLLM's CPU kernel.
    Every layer's sequences are built once per step, by the first layer, into `lanes.scratch`."""
    num_q, num_qh, dim = query.shape
    num_kv, block_size = keys.shape[1], keys.shape[2]
    view = _lane_view(keys, values)
    if view is not None and "cpu_lanes" not in lanes.scratch:
        maps = lanes.lane_maps.transpose(0, 1)  # [L, B', 2, H_kv]
        lanes.scratch["cpu_lanes"] = lane_sequences(lanes.tables, maps[:, :, 0], maps[:, :, 1], lanes.num_compacted,
                                                    lanes.query_req, lanes.query_pos, num_kv, block_size)
    seqs = None if view is None else lanes.scratch["cpu_lanes"]
    if seqs is None:
        return TORCH_CPU.lane_attention(query, keys, values, lanes, layer, scale)
    group = num_qh // num_kv
    grouped = query.view(num_q, num_kv, group, dim)
    q = grouped[seqs.token, seqs.head].contiguous()  # [S_q, G, D]
    out = torch.empty_like(q)
    seq_lens = seqs.seq_lens[layer]
    metadata = ops.cpu_attn_get_scheduler_metadata(
        seq_lens.numel(), group, 1, dim, seq_lens, query.dtype, seqs.query_start, True, -1, isa, False)
    ops.cpu_attention_with_kv_cache(
        q, view[0], view[1], out, seqs.query_start, seq_lens, scale, True, None, -1, seqs.block_table[layer],
        0.0, metadata, None)
    result = torch.empty_like(grouped)
    result[seqs.token, seqs.head] = out
    return result.view(num_q, num_qh, dim)


def cpu_adapter(isa: str) -> CacheAdapter:
    """TORCH_CPU with lane attention on vLLM's kernel for this layer's ISA."""
    return dataclasses.replace(TORCH_CPU, name="torch twins + vLLM's CPU kernel for lanes",
                               lane_attention=partial(vllm_lane_attention, isa=isa))
