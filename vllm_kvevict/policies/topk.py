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
    counts = [max(0, min(int(k), scores.shape[1])) for k in counts]
    # one stable descending sort for every head: equal scores keep their original (positional) order
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    if len(set(counts)) == 1:  # the same count for every head: one sort of the picks too
        return list(torch.sort(order[:, : counts[0]], dim=1).values.unbind(0))
    return [torch.sort(order[h, :k]).values for h, k in enumerate(counts)]


def merge_kept(protected: torch.Tensor, candidates: torch.Tensor, chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per head: protected positions plus the chosen candidate positions, as sorted token indices."""
    if chosen and len({ix.numel() for ix in chosen}) == 1:  # rectangular: every head at once
        merged = torch.cat([protected.expand(len(chosen), -1), candidates[torch.stack(chosen)]], dim=1)
        return list(torch.sort(merged, dim=1).values.unbind(0))
    return [torch.sort(torch.cat([protected, candidates[ix]])).values for ix in chosen]
