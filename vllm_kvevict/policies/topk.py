"""Top-k selection per KV head with protected positions (sinks, recent window, stabilizers)."""

from __future__ import annotations

import torch


def protected_positions(num_tokens: int, sinks: int, recent: int) -> torch.Tensor:
    """Sorted positions that always survive: the first `sinks` and the last `recent` tokens."""
    sinks = max(0, min(sinks, num_tokens))
    recent = max(0, min(recent, num_tokens - sinks))
    return torch.cat([torch.arange(sinks), torch.arange(num_tokens - recent, num_tokens)])


def candidate_positions(num_tokens: int, sinks: int, recent: int) -> torch.Tensor:
    """Positions open to eviction: strictly between the sinks and the recent window."""
    sinks = max(0, min(sinks, num_tokens))
    recent = max(0, min(recent, num_tokens - sinks))
    return torch.arange(sinks, num_tokens - recent)


def topk_per_head(scores: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """For each row h of scores [H, N], the (sorted) column indices of its `counts[h]` best entries.

    Ties break toward the earlier index so that plans are reproducible across runs.
    """
    out = []
    for h, k in enumerate(counts):
        k = max(0, min(int(k), scores.shape[1]))
        if k == 0:
            out.append(torch.empty(0, dtype=torch.long))
            continue
        # stable descending sort: equal scores keep their original (positional) order
        order = torch.sort(scores[h], descending=True, stable=True).indices
        out.append(torch.sort(order[:k]).values)
    return out


def merge_kept(protected: torch.Tensor, candidates: torch.Tensor, chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per head: protected positions plus the chosen candidate positions, as sorted token indices."""
    return [torch.sort(torch.cat([protected, candidates[ix]])).values for ix in chosen]
