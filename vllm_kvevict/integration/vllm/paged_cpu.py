"""Read and compact one request's KV in vLLM's CPU paged layout (torch; the CPU path).

CPU_ATTN allocates kv_cache [num_blocks, H_kv, bs, 2*D] per layer, but that shape is only a
container. Its kernel (`cpu_attn_reshape_and_cache`, ISAs "vec" and "vec16", measured here by
writing known keys and finding them) uses each (block, head) as 2*bs*D contiguous numbers:

    keys   : the first bs*D, transposed  [D, bs]   (key[t, d] at d*bs + t)
    values : the last  bs*D, row-major   [bs, D]   (value[t, d] at bs*D + t*D + d)

So neither "K|V side by side per slot" nor a plain [2, bs, D] split is right for keys. A request's
position p lives at block row[p // bs], slot p % bs. `gather_dense` turns the first T positions of
a row into dense K, V [H_kv, T, D]. `compact` moves the kept positions of each head into the first
slots of the row's leading blocks: kept[h, j] goes to position j of head h. Everything kept is read
into a temporary before anything is written, so a destination that is also a source (always the
case: kept[h, j] >= j) is never read after it was overwritten.
"""

from __future__ import annotations

import torch

#: The CPU attention ISAs whose cache layout this module implements.
SUPPORTED_ISAS = ("vec", "vec16")


def check_isa(isa: str) -> None:
    if isa not in SUPPORTED_ISAS:
        raise NotImplementedError(
            f"vllm-kvevict compacts the CPU KV cache in the layout of CPU_ATTN ISAs {SUPPORTED_ISAS}; "
            f"this layer uses ISA {isa!r}. Use fp32/fp16 (not bf16 on AMX) or a block size that selects 'vec'."
        )


def _slots(row: torch.Tensor, positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return row[positions // block_size].long(), positions % block_size


def kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key view [nb, H_kv, D, bs] and value view [nb, H_kv, bs, D] of one layer's cache (no copy)."""
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    flat = kv_cache.view(num_blocks, num_heads, 2, block_size * head_size)
    keys = flat[:, :, 0].view(num_blocks, num_heads, head_size, block_size)
    values = flat[:, :, 1].view(num_blocks, num_heads, block_size, head_size)
    return keys, values


def gather_dense(kv_cache: torch.Tensor, row: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values [H_kv, T, D] of positions 0..T-1 of a request's block row."""
    keys, values = kv_views(kv_cache)
    blocks, offsets = _slots(row, torch.arange(num_tokens), keys.shape[3])
    k = keys[blocks, :, :, offsets]  # [T, H_kv, D]
    v = values[blocks, :, offsets, :]  # [T, H_kv, D]
    return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()


def compact(kv_cache: torch.Tensor, row: torch.Tensor, kept: torch.Tensor) -> None:
    """In place: for each head h, position kept[h, j] moves to position j (kept: [H_kv, K], int64)."""
    keys, values = kv_views(kv_cache)
    num_heads, block_size = keys.shape[1], keys.shape[3]
    if kept.shape[0] != num_heads:
        raise ValueError(f"kept has {kept.shape[0]} heads, the cache has {num_heads}")
    heads = torch.arange(num_heads).unsqueeze(1).expand_as(kept)
    src_blocks, src_offsets = _slots(row, kept, block_size)
    k = keys[src_blocks, heads, :, src_offsets].clone()  # [H_kv, K, D]; read everything first
    v = values[src_blocks, heads, src_offsets, :].clone()
    dst = torch.arange(kept.shape[1]).unsqueeze(0).expand_as(kept)
    dst_blocks, dst_offsets = _slots(row, dst, block_size)
    keys[dst_blocks, heads, :, dst_offsets] = k
    values[dst_blocks, heads, dst_offsets, :] = v
