"""Uniform allocation: every KV head of a layer keeps the same number of tokens (SnapKV, NACL, VATP)."""

from __future__ import annotations


def uniform_allocate(num_heads: int, total: int, capacity: int) -> list[int]:
    """Split `total` selectable slots over `num_heads` heads, each holding at most `capacity`.

    When `total` does not divide evenly the first heads take one more, so the sum is exact.
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    total = max(0, min(total, num_heads * capacity))
    base, extra = divmod(total, num_heads)
    return [base + (1 if h < extra else 0) for h in range(num_heads)]
