"""Head soft vote and the selection cache: the building blocks of a selecting policy (TokenSelect,
Wu et al., arXiv 2411.02886), shared by its dense reference and the paged path.

    vote    = sum_h softmax(score_h)   over candidates; one index set for all heads (`soft_vote`)
    picked  = top-k of the vote (optionally max-pooled along tokens), sorted (`vote_topk`)
    I       = [0, n_init) U picked U [N - n_local, N) (`with_fixed_windows`)
    cache   per (request, layer): reuse the last picks while cos(q, q_cached) >= threshold

Shapes: raw scores [H, C] -> indices into the C candidates; a query [H_q, D] or a chunk [H_q, T, D].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from vllm_kvevict.policies.attention import pool_scores


def soft_vote(scores: torch.Tensor) -> torch.Tensor:
    """Head soft vote: raw scores [H, N] -> sum over heads of each head's softmax over N, [N]."""
    return torch.softmax(scores.float(), dim=-1).sum(dim=0)


def query_fingerprint(queries: torch.Tensor) -> torch.Tensor:
    """[H_q, D] (one query) or [H_q, T, D] (a chunk, averaged over T) -> flat [H_q * D]."""
    if queries.dim() == 3:
        queries = queries.float().mean(dim=1)
    return queries.float().reshape(-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def vote_topk(scores: torch.Tensor, k: int, pool_kernel: int = 0, vote_fn=soft_vote) -> torch.Tensor:
    """Indices (into the candidates, sorted) of the top-k soft-vote totals of raw scores [H, C]
    (`vote_fn`: the soft vote; the Triton kernel passes its fused one)."""
    vote = vote_fn(scores)
    if pool_kernel > 1:
        vote = pool_scores(vote.unsqueeze(0), pool_kernel, "max").squeeze(0)
    top = torch.topk(vote, min(k, vote.numel()), sorted=False).indices
    return torch.sort(top).values


def with_fixed_windows(picked: torch.Tensor, num_tokens: int, n_init: int, n_local: int) -> torch.Tensor:
    """[0, n_init) U picked U [N - n_local, N), sorted and unique (on picked's device)."""
    dev = picked.device
    fixed = torch.cat([torch.arange(min(n_init, num_tokens), device=dev),
                       torch.arange(max(0, num_tokens - n_local), num_tokens, device=dev)])
    return torch.unique(torch.cat([fixed, picked]))


@dataclass
class SelectionCache:
    """Last query fingerprint and top-k candidates per key (request, layer), with hit/miss counts."""

    threshold: float
    entries: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def lookup(self, key: Hashable, fingerprint: torch.Tensor, threshold: float | None = None) -> torch.Tensor | None:
        """The cached candidates if the new fingerprint is similar enough (`threshold`: this cache's
        own unless given), else None; counts the hit or miss."""
        entry = self.entries.get(key)
        limit = self.threshold if threshold is None else threshold
        if entry is not None and entry[0].shape == fingerprint.shape and cosine(entry[0], fingerprint) >= limit:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def lookup_batch(self, keys: list[Hashable], fingerprints: torch.Tensor, threshold: float
                     ) -> list[torch.Tensor | None]:
        """`lookup` for many keys at once (fingerprints [R, F]): one batched cosine and one host read
        of the hit mask, whatever R is; counts the hits and misses."""
        entries = [self.entries.get(key) for key in keys]
        usable = [e is not None and e[0].shape == fingerprints.shape[1:] for e in entries]
        hits = [False] * len(keys)
        if any(usable):
            cached = torch.stack([e[0] if ok else torch.zeros_like(fingerprints[0]) for e, ok in zip(entries, usable)])
            similar = torch.nn.functional.cosine_similarity(cached.double(), fingerprints.double(), dim=1) >= threshold
            hits = [bool(h) and ok for h, ok in zip(similar.tolist(), usable)]
        self.hits += sum(hits)
        self.misses += len(keys) - sum(hits)
        return [e[1] if hit else None for e, hit in zip(entries, hits)]

    def store(self, key: Hashable, fingerprint: torch.Tensor, picked: torch.Tensor) -> None:
        self.entries[key] = (fingerprint, picked)

    def drop(self, request_key: Hashable) -> None:
        """Forget every layer's entry of a finished or preempted request."""
        for key in [k for k in self.entries if isinstance(k, tuple) and k[0] == request_key]:
            del self.entries[key]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
