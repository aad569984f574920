"""Typed, range-checked policy parameters, and the ones several policies share.

Every policy declares its tunable fields as `Param`s; one generic validator checks any mapping of
values against them, so the CLI, YAML presets, `--additional-config` and per-request `vllm_xargs`
all get the same errors, naming the bad value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vllm_kvevict.policies.gqa import REDUCTIONS


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


# ---- fields several policies share ----------------------------------------------------------------
MAX_TOKENS = 1 << 20


def window(default: int = 32) -> Param:
    return Param("window", int, default, "observation window: trailing prompt queries that score, always kept",
                 1, MAX_TOKENS)


def decode_interval(default: int = 0) -> Param:
    """Re-compaction during decode (the core moves the grown tail back into the budget)."""
    return Param("decode_interval", int, default,
                 "generated tokens the tail may grow before it is re-compacted into the budget (0: never)",
                 0, MAX_TOKENS)


def sink_tokens(default: int) -> Param:
    return Param("sink_tokens", int, default, "first tokens that are never evicted (attention sinks)", 0, MAX_TOKENS)


KERNEL_SIZE = Param("kernel_size", int, 11, "pooling kernel along tokens (the SnapKV paper: 7, centred; 11 "
                    "following keeps a retrieved value whole, docs/results.md's pool_align ablation)", 1, 255)


def pooling(default: str = "max") -> Param:
    return Param("pooling", str, default, "pooling of window scores along tokens", choices=("max", "avg", "none"))


POOLING = pooling()
POOL_ALIGN = Param("pool_align", str, "follow", "where the pooling kernel sits: 'center' (SnapKV: a hit lifts its "
                   "k//2 neighbours each side) or 'follow' (a hit lifts the k-1 tokens after it)",
                   choices=("center", "follow"))


def pool_share(default: float = 1.0) -> Param:
    return Param("pool_share", float, default, "share of the kept tokens picked by pooled scores, the rest by the "
                 "unpooled ones (1: pooled only; 0: unpooled, as VATP's and NACL's papers)", 0.0, 1.0)


VALUE_WEIGHT = Param("value_weight", str, "none", "weight each token's window attention by its value norm before "
                     "pooling ('norm': a token moves the output by attention x ||v||, after CriticalKV)",
                     choices=("none", "norm"))
WINDOW_REDUCE = Param("window_reduce", str, "max", "how the window's queries' attention becomes one score per token: "
                      "'mean' (SnapKV) or 'max' (the most any query gives it, floored at that maximum's mean over "
                      "tokens: DefensiveKV's aggregation; docs/results.md's window_reduce ablation)",
                      choices=("mean", "max"))
GQA_REDUCE = Param("gqa_reduce", str, "mean", "how a GQA group's query-head scores become one KV-head score",
                   choices=REDUCTIONS)
MIN_PROMPT_LEN = Param("min_prompt_len", int, 0, "prompts this short or shorter are not compressed", 0, MAX_TOKENS)
