"""The one budget parser and resolver, shared by every entry point and every policy.

A budget is a token count (an integer >= 1) or a ratio of the prompt (0 < r <= 1, written with a dot, or
as a fraction "1/8"). An eviction policy keeps that many tokens per KV head on average in every layer;
a selecting policy attends to that many selected tokens per query (a ratio is of the context).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

_ALLOWED = "a token count >= 1 or a ratio in (0, 1] (0.125 or 1/8)"


def parse_budget(value: Any, where: str = "") -> int | float:
    """`256` and `"256"` are 256 tokens; `0.125`, `"0.125"` and `"1/8"` are 12.5% of the prompt; `1.0` and
    `"1/1"` keep all. Raises ValueError naming the value and what is allowed."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}budget={value!r} is invalid: expected {_ALLOWED}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:  # a fraction of the prompt
                value = float(Fraction(text))
            else:
                value = float(text) if any(c in text for c in ".eE") else int(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{where}budget={text!r} is invalid: expected {_ALLOWED}") from None
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{where}budget={value!r} is out of range: a token count must be >= 1")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{where}budget={value!r} is out of range: a ratio must be in (0, 1]; "
                             "write a token count as an integer")
        return value
    raise ValueError(f"{where}budget={value!r} is invalid: expected {_ALLOWED}")


def resolve_budget(budget: int | float, num_tokens: int) -> int:
    """The budget in tokens for a prompt (or context) of `num_tokens` tokens: at least 1, at most all."""
    if isinstance(budget, float):
        tokens = max(1, math.ceil(budget * num_tokens - 1e-9))
    else:
        tokens = budget
    return min(tokens, num_tokens)
