"""Typed, range-checked policy parameters.

Every policy declares its tunable fields as `Param`s; one generic validator checks any mapping of
values against them, so the CLI, YAML presets, `--additional-config` and per-request `vllm_xargs`
all get the same errors, naming the bad value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One tunable field: its type, default, allowed range or choices, and a one-line help."""

    name: str
    kind: type  # int, float, str or bool
    default: Any
    help: str
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None is an allowed value

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        lo = "-inf" if self.low is None else _fmt(self.low)
        hi = "inf" if self.high is None else _fmt(self.high)
        what = "an integer" if self.kind is int else "a number" if self.kind is float else "a string"
        rng = f" in [{lo}, {hi}]" if self.kind in (int, float) else ""
        return what + rng + (" or null" if self.optional else "")

    def check(self, value: Any, where: str) -> Any:
        """Return the value coerced to `kind`, or raise ValueError naming it and what is allowed."""
        if value is None and self.optional:
            return None
        coerced = _coerce(self.kind, value)
        if coerced is None:
            raise ValueError(f"{where}{self.name}={value!r} is invalid: expected {self.allowed()}")
        if self.choices is not None and coerced not in self.choices:
            raise ValueError(f"{where}{self.name}={value!r} is invalid: expected {self.allowed()}")
        if self.kind in (int, float):
            if (self.low is not None and coerced < self.low) or (
                self.high is not None and coerced > self.high
            ):
                raise ValueError(f"{where}{self.name}={value!r} is out of range: expected {self.allowed()}")
        return coerced


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _coerce(kind: type, value: Any) -> Any:
    # Strings come from the command line and YAML; accept them where they parse cleanly.
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        return None
    if kind is int:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return None
        return None
    if kind is float:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                return None
        else:
            return None
        return out if math.isfinite(out) else None
    if kind is str:
        return value if isinstance(value, str) else None
    raise TypeError(f"unsupported parameter kind {kind!r}")


def parse_budget(value: Any, where: str = "") -> int | float:
    """A budget is a token count (integer >= 1) or a ratio of the prompt (0 < r <= 1, written with a dot).

    `256` and `"256"` are 256 tokens; `0.125` and `"0.125"` are 12.5% of the prompt; `1.0` keeps all.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}budget={value!r} is invalid: expected a token count >= 1 or a ratio in (0, 1]")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError(
                f"{where}budget={value!r} is invalid: expected a token count >= 1 or a ratio in (0, 1]"
            ) from None
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{where}budget={value!r} is out of range: a token count must be >= 1")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"{where}budget={value!r} is out of range: a ratio must be in (0, 1]; "
                "write a token count as an integer"
            )
        return value
    raise ValueError(f"{where}budget={value!r} is invalid: expected a token count >= 1 or a ratio in (0, 1]")


def resolve_budget(budget: int | float, num_tokens: int) -> int:
    """Tokens kept per KV head for a prompt of `num_tokens` tokens (never more than the prompt)."""
    if isinstance(budget, float):
        tokens = max(1, math.ceil(budget * num_tokens - 1e-9))
    else:
        tokens = budget
    return min(tokens, num_tokens)
