"""Scoring of task outputs and confidence intervals (pure Python; used by `vllm-kvevict eval`)."""

from __future__ import annotations

import math
import random
import re
from typing import Sequence


def contains_all(text: str, answers: Sequence[str]) -> float:
    """1.0 if every answer appears in `text` as a whole token (a number not inside a longer number,
    a name not inside a longer word), else 0.0. An empty answer list is an error."""
    if not answers:
        raise ValueError("contains_all needs at least one answer")
    for answer in answers:
        if not re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", text):
            return 0.0
    return 1.0


def prefix_agreement(reference: Sequence[int], tokens: Sequence[int], n: int) -> float:
    """Fraction of the reference's first n tokens reproduced before the first difference."""
    n = min(n, len(reference))
    if n <= 0:
        raise ValueError("prefix_agreement needs a non-empty reference")
    same = 0
    for a, b in zip(reference[:n], tokens):
        if a != b:
            break
        same += 1
    return same / n


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) of teacher-forced tokens."""
    if not logprobs:
        raise ValueError("perplexity needs at least one token")
    return math.exp(-sum(logprobs) / len(logprobs))


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a binomial proportion."""
    if n <= 0:
        raise ValueError("wilson needs n >= 1")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float], seed: int = 0, rounds: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so reports are reproducible)."""
    if not values:
        raise ValueError("bootstrap needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    lo = means[int((1 - level) / 2 * rounds)]
    hi = means[min(rounds - 1, int((1 + level) / 2 * rounds))]
    return lo, hi


def summarize(scores: Sequence[float], seed: int = 0) -> dict[str, float]:
    """accuracy (mean), n and a 95% interval: Wilson when every score is 0 or 1, bootstrap otherwise."""
    n = len(scores)
    mean = sum(scores) / n if n else float("nan")
    if all(s in (0.0, 1.0) for s in scores):
        lo, hi = wilson(sum(scores), n)
    else:
        lo, hi = bootstrap(scores, seed)
    return {"accuracy": mean, "n": n, "ci_low": lo, "ci_high": hi}
