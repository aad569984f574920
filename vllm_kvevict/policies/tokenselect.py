"""TokenSelect (Wu et al., arXiv 2411.02886): per-query token selection by head soft vote.

Nothing is evicted. For each decode query (or a prefill chunk's mean query) and layer:
  score_h = q_h . K_h^T             raw dot products, no 1/sqrt(d) (SPEC.md 5.9)
  vote    = sum_h softmax(score_h)  over the candidates [n_init, N - n_local)
  I       = [0, n_init) U topk(vote, k) U [N - n_local, N)
The softmax stops a head with large logits from dominating; all query heads share one index set.
A selection cache per (request, layer) reuses the last indices while the new query's cosine
similarity to the cached one is >= threshold.

Shapes: query [H_q, D], keys [H_kv, N, D] -> indices [<= n_init + k + n_local] (sorted, int64).
GQA: query head h reads KV head h // g, the model's own layout (the reference kernel's h % H_kv is
wrong for HF-ordered heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from vllm_kvevict.policies.attention import pool_scores
from vllm_kvevict.policies.gqa import expand_kv


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


def select_tokens(
    query: torch.Tensor, keys: torch.Tensor, n_init: int, n_local: int, top_k: int, pool_kernel: int = 0
) -> torch.Tensor:
    """The token indices one query attends to (all of them when the context is short)."""
    num_tokens = keys.shape[1]
    if num_tokens <= n_init + top_k + n_local:
        return torch.arange(num_tokens)
    picked = select_candidates(query, keys, n_init, n_local, top_k, pool_kernel)
    return with_fixed_windows(picked, num_tokens, n_init, n_local)


def select_candidates(
    query: torch.Tensor, keys: torch.Tensor, n_init: int, n_local: int, top_k: int, pool_kernel: int = 0
) -> torch.Tensor:
    """The top-k candidate positions (absolute, sorted) by head soft vote."""
    num_tokens = keys.shape[1]
    cand = keys[:, n_init : num_tokens - n_local].float()  # [H_kv, C, D]
    k = expand_kv(cand, query.shape[0] // keys.shape[0])
    scores = torch.einsum("hd,hcd->hc", query.float(), k)
    return vote_topk(scores, top_k, pool_kernel) + n_init


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


class TokenSelect:
    """The `tokenselect` policy: `budget` is k, the tokens selected per query besides the fixed windows."""

    name = "tokenselect"
    kind = "select"

    def __init__(self, budget: int | float, params: dict[str, Any]):
        if not isinstance(budget, int):
            raise ValueError(f"tokenselect budget={budget!r} is invalid: expected a token count k (an integer >= 1)")
        self.budget = budget
        self.params = dict(params)
        self.top_k = budget
        self.n_init = int(self.params.get("n_init", 128))
        self.n_local = int(self.params.get("n_local", 512))
        self.pool_kernel = int(self.params.get("select_pool_kernel", 0))
        self.prefill_chunk = int(self.params.get("prefill_chunk", 512))
        self.threshold = float(self.params.get("similarity_threshold", 0.9))
        self.cache = SelectionCache(self.threshold)

    def query_window(self, num_tokens: int) -> int:
        return 0

    def pieces(self, first: int, last: int) -> list[tuple[int, int]]:
        """Positions [first, last) of one step cut at multiples of `prefill_chunk`: each piece selects
        once, by its mean query (the official code's 512-query chunks, aligned to absolute positions)."""
        size = self.prefill_chunk
        cuts = [first] + list(range((first // size + 1) * size, last, size)) + [last]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]

    def selects_within(self, first: int, last: int) -> bool:
        """Whether any piece of positions [first, last) selects (the last piece starts latest)."""
        pieces = self.pieces(first, last)
        return bool(pieces) and self.selects(pieces[-1][0])

    def selects(self, num_tokens: int) -> bool:
        """Whether a query over `num_tokens` cached tokens selects (else it attends to all of them)."""
        return num_tokens > self.n_init + self.top_k + self.n_local

    def select(self, query: torch.Tensor, keys: torch.Tensor, cache_key: Hashable | None = None) -> torch.Tensor:
        """Indices for query [H_q, D] (or a chunk [H_q, T, D]) over keys [H_kv, N, D]."""
        num_tokens = keys.shape[1]
        if not self.selects(num_tokens):
            return torch.arange(num_tokens)
        fp = query_fingerprint(query)
        picked = self.cache.lookup(cache_key, fp) if cache_key is not None else None
        if picked is None:
            q = query.float().mean(dim=1) if query.dim() == 3 else query
            picked = select_candidates(q, keys, self.n_init, self.n_local, self.top_k, self.pool_kernel)
            if cache_key is not None:
                self.cache.store(cache_key, fp, picked)
        # cached picks may now sit inside the grown local window: the union dedups them
        return with_fixed_windows(picked[picked < num_tokens], num_tokens, self.n_init, self.n_local)

    def describe(self) -> str:
        return f"tokenselect(k={self.top_k}, n_init={self.n_init}, n_local={self.n_local}, threshold={self.cache.threshold})"
