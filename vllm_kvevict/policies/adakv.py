"""Ada-KV adaptive per-head budget allocation (Feng et al., arXiv 2407.11550).

Heads whose attention is spread out need more slots to keep the same attention mass; focused heads
need few. Maximising the retained attention weight sum_h sum_{j in S_h} a_h[j] under sum_h |S_h| = B
is solved exactly by the global top-B over all heads' scores: head h gets the number of the global
top-B entries that fall in its row (SPEC.md 3.2). The safeguard floor alpha guarantees every head
at least int(alpha * B / H) slots (SPEC.md 3.9).

Shapes: scores [H_kv, N] (candidate tokens only), returns budgets [H_kv] as a list of ints.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from vllm_kvevict.policies.params import Param

ADA_MODES = ("exact", "official")
FLOOR_ALPHA = Param("floor_alpha", float, 0.2, "Ada-KV safeguard: each head keeps at least alpha x the uniform share",
                    0.0, 1.0)
ADA_MODE = Param("ada_mode", str, "exact", "'exact' sums to the budget; 'official' rounds like the reference code",
                 choices=ADA_MODES)


def adakv_allocate(scores: torch.Tensor, total: int, floor_alpha: float = 0.0, mode: str = "exact") -> list[int]:
    """Per-head budgets summing to `total` (mode "exact") or per the official rounding ("official").

    exact: each head first takes its floor int(alpha * total / H) (its own best tokens), then the
        remaining slots go to the global top over everything not yet taken. The sum is exactly `total`.
    official: cap_h = round(c_h * (1 - alpha) + floor), c_h = global top-total counts, torch.round
        (half to even). This reproduces the reference code; the sum may differ from `total` by rounding.
    """
    num_heads, num_cand = scores.shape
    total = max(0, min(int(total), num_heads * num_cand))
    if not 0.0 <= floor_alpha <= 1.0:
        raise ValueError(f"floor_alpha={floor_alpha!r} is out of range: expected a number in [0, 1]")
    if mode not in ADA_MODES:
        raise ValueError(f"ada_mode={mode!r} is invalid: expected one of {', '.join(ADA_MODES)}")
    if total == 0 or num_cand == 0:
        return [0] * num_heads
    floor = int((total // num_heads) * floor_alpha)
    if mode == "official":
        counts = _global_counts(scores, total)
        caps = torch.round(counts.double() * (1.0 - floor_alpha) + floor).long()
        return [int(c) for c in caps.clamp(0, num_cand)]
    floor = min(floor, num_cand)
    taken = torch.zeros_like(scores, dtype=torch.bool)
    if floor > 0:
        best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :floor]
        taken.scatter_(1, best, True)
    rest = total - floor * num_heads
    masked = scores.float().masked_fill(taken, float("-inf"))
    counts = _global_counts(masked, rest)
    return [floor + int(c) for c in counts]


def _global_counts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """How many of the global top-k entries of scores [H, N] fall in each row."""
    num_heads, num_cand = scores.shape
    if k <= 0:
        return torch.zeros(num_heads, dtype=torch.long)
    flat = scores.reshape(-1)
    # stable sort so that ties go to lower heads / earlier tokens deterministically
    top = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.bincount(top // num_cand, minlength=num_heads)


def adakv_allocate_lanes(scores: torch.Tensor, total_lanes: int, lane_size: int, protected: int,
                         floor_alpha: float = 0.0) -> list[int]:
    """Ada-KV at lane granularity: lanes per head, summing to `total_lanes` (the paged head-lane layout).

    Memory is paid in lanes of `lane_size` slots, so the global top-B runs over whole lanes: a head's
    k-th lane holds its next `lane_size` best candidates (after its `protected` tokens, which fill its
    first lanes), worth their score sum. Scores sorted per head make these gains non-increasing, so
    taking the best gains greedily maximises the kept score mass for the lane count, as the global
    top-B does per token. Every head first gets the lanes its protected tokens and the safeguard floor
    int(alpha * B / H) need (B = the candidate slots). Shapes: scores [H_kv, N] -> list of H_kv ints.
    """
    num_heads, num_cand = scores.shape
    if not 0.0 <= floor_alpha <= 1.0:
        raise ValueError(f"floor_alpha={floor_alpha!r} is out of range: expected a number in [0, 1]")
    free = max(0, total_lanes * lane_size - protected * num_heads)
    floor = min(num_cand, int((free // num_heads) * floor_alpha))
    cap = -(-(protected + num_cand) // lane_size)
    base = min(cap, max(1, -(-(protected + floor) // lane_size)))
    lanes = [base] * num_heads
    left = total_lanes - base * num_heads
    if left <= 0:
        return lanes if left == 0 else _take_back(lanes, -left)
    ordered = torch.sort(scores.float(), dim=1, descending=True, stable=True).values
    padded = torch.zeros(num_heads, cap * lane_size)
    padded[:, protected : protected + num_cand] = ordered  # slot j of a head's lanes: protected first
    gains = padded.view(num_heads, cap, lane_size).sum(dim=2)[:, base:]  # [H, cap - base], non-increasing
    flat = gains.reshape(-1)
    # ties go to lower heads and earlier lanes; a lane with no candidates left gains nothing
    order = torch.sort(flat, descending=True, stable=True).indices[: min(left, flat.numel())]
    extra = torch.bincount(order // gains.shape[1], minlength=num_heads) if gains.shape[1] else torch.zeros(num_heads)
    return [b + int(e) for b, e in zip(lanes, extra)]


def _take_back(lanes: list[int], count: int) -> list[int]:
    lanes = list(lanes)
    for _ in range(count):
        h = max(range(len(lanes)), key=lambda i: (lanes[i], -i))
        lanes[h] = max(0, lanes[h] - 1)
    return lanes


def allocate_lanes(token_counts: Sequence[int], total_lanes: int, block_size: int, capacity: int,
                   min_lanes: int = 1) -> list[int]:
    """Round per-head token budgets to whole lanes, summing to exactly `total_lanes` where possible.

    Largest remainder: each head first gets floor(count / bs) lanes (at least `min_lanes`), then the
    leftover lanes go to the largest fractional parts (ties: lower head). No head gets more lanes
    than `ceil(capacity / bs)` (it has only `capacity` candidate tokens). Memory is then exactly
    `total_lanes` lanes, and every lane is full: a head fills its last lane with its next-best tokens.
    """
    num_heads = len(token_counts)
    if num_heads == 0:
        raise ValueError("allocate_lanes needs at least one head")
    cap = math.ceil(capacity / block_size) if capacity > 0 else 0
    floor = min(min_lanes, cap)
    lanes = [min(cap, max(floor, c // block_size)) for c in token_counts]
    left = total_lanes - sum(lanes)
    order = sorted(range(num_heads), key=lambda h: (-(token_counts[h] % block_size), h))
    while left > 0:  # hand out the rest by fractional part, round robin until full
        progressed = False
        for h in order:
            if left == 0:
                break
            if lanes[h] < cap:
                lanes[h] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    while left < 0:  # floors overshot (many heads, few lanes): take back from the largest
        h = max(range(num_heads), key=lambda i: (lanes[i], -i))
        if lanes[h] <= 0:
            break
        lanes[h] -= 1
        left += 1
    return lanes
