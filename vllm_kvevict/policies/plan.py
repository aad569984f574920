"""What a policy sees (`LayerView`) and what it returns (`KeepPlan`).

Policies never see vLLM: the integration layer builds a dense per-request, per-layer view and
applies the plan to the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerView:
    """One request's prompt KV for one layer, plus the queries a scorer may need.

    keys, values: [H_kv, T, D], RoPE already applied to keys (as cached); values None unless the policy
        declares Need.VALUES (the core gathers none for a scorer that reads none).
    queries: [H_q, W, D], the last W prompt queries (observation window / proxy tokens), RoPE applied,
        or None when the policy needs none. Their positions are T-W .. T-1 unless query_start says.
    layer, num_layers: which layer this is, for per-layer budget schedules and seeding.
    extra: policy-specific inputs (e.g. Locret's pre-RoPE q/k/v, VATP's running scores).
    key_mask: [H_kv, T] bool, False where a head has no key (a head-lane view pads each head's lanes to
        the longest before the shared tail); None: every key is real.
    """

    keys: torch.Tensor
    values: torch.Tensor | None
    queries: torch.Tensor | None = None
    query_start: int | None = None  # position of the first query; None: the last W positions
    layer: int = 0
    num_layers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    key_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.keys.dim() != 3 or (self.values is not None and self.values.dim() != 3):
            got = None if self.values is None else tuple(self.values.shape)
            raise ValueError(f"keys/values must be [H_kv, T, D], got {tuple(self.keys.shape)} / {got}")
        if self.values is not None and self.keys.shape[:2] != self.values.shape[:2]:
            raise ValueError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} disagree on [H_kv, T]")
        if self.queries is not None:
            if self.queries.dim() != 3 or self.queries.shape[-1] != self.keys.shape[-1]:
                raise ValueError(f"queries must be [H_q, W, D] with D={self.keys.shape[-1]}, got {tuple(self.queries.shape)}")
            if self.queries.shape[0] % self.keys.shape[0]:
                raise ValueError(
                    f"query heads ({self.queries.shape[0]}) must be a multiple of KV heads ({self.keys.shape[0]})"
                )
        if self.key_mask is not None and tuple(self.key_mask.shape) != tuple(self.keys.shape[:2]):
            raise ValueError(f"key_mask must be [H_kv, T] = {tuple(self.keys.shape[:2])}, got {tuple(self.key_mask.shape)}")
        if not 0 <= self.layer < self.num_layers:
            raise ValueError(f"layer={self.layer} must be in [0, num_layers={self.num_layers})")

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        return 1 if self.queries is None else self.queries.shape[0] // self.keys.shape[0]


@dataclass
class KeepPlan:
    """Kept token indices per KV head (sorted, int64), out of `num_tokens` prompt tokens.

    Heads may keep different tokens and, for Ada-KV, different numbers of them (ragged).
    """

    indices: list[torch.Tensor]
    num_tokens: int

    @property
    def lengths(self) -> list[int]:
        return [int(ix.numel()) for ix in self.indices]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @property
    def is_noop(self) -> bool:
        return all(n == self.num_tokens for n in self.lengths)

    def mask(self) -> torch.Tensor:
        """Boolean keep mask [H_kv, T]."""
        out = torch.zeros(len(self.indices), self.num_tokens, dtype=torch.bool)
        for h, ix in enumerate(self.indices):
            out[h, ix] = True
        return out

    def padded(self, fill: int = -1) -> torch.Tensor:
        """Indices as a rectangular [H_kv, max_len] tensor, short heads padded with `fill`."""
        out = torch.full((len(self.indices), self.max_len), fill, dtype=torch.long)
        for h, ix in enumerate(self.indices):
            out[h, : ix.numel()] = ix
        return out

    @classmethod
    def keep_all(cls, num_heads: int, num_tokens: int) -> KeepPlan:
        return cls([torch.arange(num_tokens) for _ in range(num_heads)], num_tokens)
