"""Grouped-query attention: reduce per-query-head scores to per-KV-head scores.

Query head h reads KV head h // g (the layout of HF `repeat_kv` and of vLLM's kernels).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "max", "sum")


def reduce_groups(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """scores [H_q, ...] -> [H_kv, ...], reducing each group of g = H_q / H_kv query heads."""
    num_q = scores.shape[0]
    if num_q % num_kv_heads:
        raise ValueError(f"query heads ({num_q}) must be a multiple of KV heads ({num_kv_heads})")
    grouped = scores.reshape(num_kv_heads, num_q // num_kv_heads, *scores.shape[1:])
    if how == "mean":
        return grouped.mean(dim=1)
    if how == "max":
        return grouped.amax(dim=1)
    if how == "sum":
        return grouped.sum(dim=1)
    raise ValueError(f"gqa_reduce={how!r} is invalid: expected one of {', '.join(REDUCTIONS)}")


def expand_kv(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[H_kv, ...] -> [H_kv * g, ...] so that query head h pairs with KV head h // g."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=0)
