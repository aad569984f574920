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

from typing import Any, Hashable

import torch

from vllm_kvevict.policies.base import Policy
from vllm_kvevict.policies.budget import resolve_budget
from vllm_kvevict.policies.declaration import Declaration, KeptLayout, Trigger
from vllm_kvevict.policies.gqa import expand_kv
from vllm_kvevict.policies.params import MAX_TOKENS, Param
from vllm_kvevict.policies.soft_vote import SelectionCache, query_fingerprint, vote_topk, with_fixed_windows


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


class TokenSelect(Policy):
    """The `tokenselect` policy: `budget` is k, the tokens selected per query besides the fixed windows
    (a ratio r selects ceil(r x context), at least 1)."""

    name = "tokenselect"
    description = "per-query head-soft-vote top-k over the full cache; nothing freed"
    param_specs = (
        Param("n_init", int, 128, "initial tokens every query attends to", 0, MAX_TOKENS),
        Param("n_local", int, 512, "recent tokens every query attends to", 0, MAX_TOKENS),
        Param("similarity_threshold", float, 0.9, "selection-cache reuse when cos(q, q_cached) >= this", -1.0, 1.0),
        Param("select_pool_kernel", int, 0, "max-pool the vote along tokens (0: off)", 0, 255),
        Param("prefill_chunk", int, 512, "prefill queries select once per this many positions (mean query)",
              1, MAX_TOKENS),
    )
    default_budget = 2048
    trigger = Trigger.PER_QUERY

    def __init__(self, budget: int | float, params: dict[str, Any]):
        super().__init__(budget, params)
        self.n_init = int(self.params["n_init"])
        self.n_local = int(self.params["n_local"])
        self.pool_kernel = int(self.params["select_pool_kernel"])
        self.prefill_chunk = int(self.params["prefill_chunk"])
        self.threshold = float(self.params["similarity_threshold"])
        self.cache = SelectionCache(self.threshold)

    def declare(self) -> Declaration:
        return Declaration(self.trigger, layout=KeptLayout.UNCHANGED)

    def top_k(self, num_tokens: int) -> int:
        """k for a query over `num_tokens` cached tokens: the budget, or its ratio of them (at least 1)."""
        return resolve_budget(self.budget, max(1, num_tokens))

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
        return num_tokens > self.n_init + self.top_k(num_tokens) + self.n_local

    def first_selecting_context(self) -> int | None:
        """The fewest cached tokens a query piece selects over (None: it never selects). A piece starting
        before it attends to everything, so the KV of every position below it is the full cache's."""
        fixed = self.n_init + self.n_local
        if isinstance(self.budget, float):
            if self.budget >= 1.0:
                return None
            start = max(fixed + 1, int(fixed / (1.0 - self.budget)) - 2)
        else:
            start = fixed + self.budget + 1
        while not self.selects(start):
            start += 1
        return start

    def with_windows(self, picked: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[0, n_init) U picked U [num_tokens - n_local, num_tokens), sorted and unique."""
        return with_fixed_windows(picked, num_tokens, self.n_init, self.n_local)

    def select(self, query: torch.Tensor, keys: torch.Tensor, cache_key: Hashable | None = None) -> torch.Tensor:
        """Indices for query [H_q, D] (or a chunk [H_q, T, D]) over keys [H_kv, N, D]."""
        num_tokens = keys.shape[1]
        if not self.selects(num_tokens):
            return torch.arange(num_tokens)
        fp = query_fingerprint(query)
        picked = self.cache.lookup(cache_key, fp) if cache_key is not None else None
        if picked is None:
            q = query.float().mean(dim=1) if query.dim() == 3 else query
            picked = select_candidates(q, keys, self.n_init, self.n_local, self.top_k(num_tokens), self.pool_kernel)
            if cache_key is not None:
                self.cache.store(cache_key, fp, picked)
        # cached picks may now sit inside the grown local window: the union dedups them
        return self.with_windows(picked[picked < num_tokens], num_tokens)

    def describe(self) -> str:
        return f"tokenselect(k={self.budget}, n_init={self.n_init}, n_local={self.n_local}, threshold={self.cache.threshold})"
