"""Neutral views of one layer's paged KV cache, for each attention backend's memory layout.

Everything below the backends (compaction, lane attention, selection) reads and writes keys and values
through two views shaped [num_blocks, H_kv, block_size, head_size] with whatever strides the backend's
layout gives: a position p of a request with block row `row` is view[row[p // bs], h, p % bs, :].

CPU_ATTN allocates kv_cache [num_blocks, H_kv, bs, 2*D] per layer, but that shape is only a container.
Its kernel (`cpu_attn_reshape_and_cache`, ISAs "vec" and "vec16", measured here by writing known keys
and finding them) uses each (block, head) as 2*bs*D contiguous numbers:

    keys   : the first bs*D, transposed  [D, bs]   (key[t, d] at d*bs + t)
    values : the last  bs*D, row-major   [bs, D]   (value[t, d] at bs*D + t*D + d)

TRITON_ATTN (the flash layout) hands the impl kv_cache in logical [num_blocks, H_kv, bs, 2*D] order
(physically possibly [num_blocks, bs, H_kv, 2*D]): keys are the first D numbers of each slot, values
the last D.
"""

from __future__ import annotations

import torch

#: The CPU attention ISAs whose cache layout `cpu_views` implements.
SUPPORTED_CPU_ISAS = ("vec", "vec16")


def check_cpu_isa(isa: str) -> None:
    if isa not in SUPPORTED_CPU_ISAS:
        raise NotImplementedError(
            f"vllm-kvevict compacts the CPU KV cache in the layout of CPU_ATTN ISAs {SUPPORTED_CPU_ISAS}; "
            f"this layer uses ISA {isa!r}. Use fp32/fp16 (not bf16 on AMX) or a block size that selects 'vec'."
        )


def cpu_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [nb, H_kv, bs, D] of one CPU_ATTN layer cache (views, no copy)."""
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    flat = kv_cache.view(num_blocks, num_heads, 2, block_size * head_size)
    keys = flat[:, :, 0].view(num_blocks, num_heads, head_size, block_size).transpose(-1, -2)
    values = flat[:, :, 1].view(num_blocks, num_heads, block_size, head_size)
    return keys, values


def flash_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [nb, H_kv, bs, D] of one TRITON_ATTN layer cache (logical [nb, H_kv, bs, 2*D])."""
    head_size = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_size], kv_cache[..., head_size:]
