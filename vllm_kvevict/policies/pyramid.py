"""PyramidKV's per-layer budget schedule (Cai et al., 2024), as used by Ada-Pyramid (SPEC.md 3.9).

Lower layers attend broadly and get more slots, upper layers fewer; the mean over layers stays the
uniform budget. Linear from `max` at layer 0 to `min = base / beta` at the last layer.
"""

from __future__ import annotations

from vllm_kvevict.policies.params import Param

PYRAMID_BETA = Param("pyramid_beta", float, 20.0, "pyramid steepness: the top layer keeps base/beta", 1.0001, 1e6)


def pyramid_budgets(base: int, num_layers: int, beta: float, capacity: int) -> list[int]:
    """Selectable slots per head for each layer; their mean is `base` (up to integer rounding).

    `capacity` caps any layer (the number of candidate tokens); when the top of the pyramid would
    exceed it, the top is clamped and the bottom raised so that the mean is kept.
    """
    if beta <= 1.0:
        raise ValueError(f"pyramid_beta={beta!r} is out of range: expected a number > 1")
    if num_layers <= 1 or base <= 0:
        return [max(0, min(base, capacity))] * max(1, num_layers)
    lo = base / beta
    hi = 2 * base - lo
    if hi > capacity:
        hi = float(capacity)
        lo = max(0.0, 2 * base - hi)
    step = (hi - lo) / (num_layers - 1)
    raw = [hi - layer * step for layer in range(num_layers)]
    out = [int(x) for x in raw]
    # hand the rounding remainder to the layers with the largest fractional parts: the sum stays exact
    short = base * num_layers - sum(out)
    order = sorted(range(num_layers), key=lambda i: raw[i] - out[i], reverse=True)
    for i in order[: max(0, short)]:
        out[i] += 1
    return [max(0, min(x, capacity)) for x in out]
