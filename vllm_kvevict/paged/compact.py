"""Read a request's KV densely and move kept tokens inside its blocks (torch; the CPU path's twins).

All functions take neutral key / value views [num_blocks, H_kv, bs, D] (`cache_layout`). A request's
position p lives at block row[p // bs], slot p % bs.

Rectangular compaction keeps K tokens per KV head in the first K positions of the row, each head its
own selection (RoPE is already in the keys, so a token may move to another slot):

    head h:   kept[h, 0]  kept[h, 1] ... kept[h, K-1]      (ascending logical positions)
                  |           |              |
                  v           v              v
    position:     0           1     ...     K-1            (the row's leading blocks)

kept[h, j] >= j, so a destination is often another kept token's source: `move_tokens` reads every
source into a staging buffer before writing anything. Ragged head-lane packing (`lanes.pack_lanes`)
is the same move with other addresses. `move_triton.move_tokens` is the Triton twin.
"""

from __future__ import annotations

import torch

Addresses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (block, head or lane, slot), one entry per token


def gather_dense(keys: torch.Tensor, values: torch.Tensor | None, row: torch.Tensor, num_tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense keys and values [H_kv, T, D] of positions 0..T-1 of a request's block row (values None: not
    read, for a scorer that needs none)."""
    return dense_row(keys, row, num_tokens), None if values is None else dense_row(values, row, num_tokens)


def dense_row(cache: torch.Tensor, row: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions 0..T-1 of `row` in one key or value view, dense [H_kv, T, D]: whole blocks gathered (one
    gather per block, not per token), then laid out head-major and cut to T. Every cache layout gives the
    same token-major result, so the CPU and Triton paths score bit for bit alike (gathering CPU_ATTN's
    transposed keys as stored was ~3% faster on CPU but made q . k^T round differently there, and the
    paths then kept different tokens on near-ties)."""
    picked = cache.index_select(0, row[: -(-num_tokens // cache.shape[2])].long())  # [n, H_kv, bs, D]
    return picked.transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :num_tokens]


def rect_addresses(row: torch.Tensor, kept: torch.Tensor, block_size: int, into: torch.Tensor | None = None
                   ) -> tuple[Addresses, Addresses]:
    """Sources and destinations of rectangular compaction: head h's kept[h, j] moves to position j of
    `into` (default: the row itself; copy-on-compact passes the fresh blocks)."""
    num_heads, num_kept = kept.shape
    kept = kept.to(row.device).long()
    heads = torch.arange(num_heads, device=row.device).unsqueeze(1).expand_as(kept).reshape(-1)
    src = kept.reshape(-1)
    dst = torch.arange(num_kept, device=row.device).repeat(num_heads)
    return ((row[src // block_size].long(), heads, src % block_size),
            ((row if into is None else into)[dst // block_size].long(), heads, dst % block_size))


def move_tokens(keys: torch.Tensor, values: torch.Tensor, src: Addresses, dst: Addresses) -> None:
    """In place: keys/values[dst[i]] = old keys/values[src[i]] for every i (all reads staged first)."""
    staged_k, staged_v = keys[src], values[src]  # advanced indexing copies: the staging buffer
    keys[dst] = staged_k
    values[dst] = staged_v


def compact(keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor, kept: torch.Tensor) -> None:
    """In place: for each head h, position kept[h, j] moves to position j (kept: [H_kv, K], int64)."""
    if kept.shape[0] != keys.shape[1]:
        raise ValueError(f"kept has {kept.shape[0]} heads, the cache has {keys.shape[1]}")
    move_tokens(keys, values, *rect_addresses(row, kept, keys.shape[2]))
