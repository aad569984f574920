"""The eviction pipeline shared by every evict-kind policy: score -> allocate -> select.

A policy is a scorer (tokens -> scores per KV head), an allocator (budget per layer and head), and a
selector (top-k around protected sinks and a recent window). Subclasses override the pieces that
make their method (DESIGN.md section 4). Nothing here knows about vLLM.

Budget semantics: `budget` is the number of tokens each KV head keeps on average in every layer,
protected tokens included. Protected tokens always survive, so a budget below them keeps exactly
the protected tokens. A budget >= the prompt keeps everything.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm_kvevict.policies.adakv import adakv_allocate, adakv_allocate_lanes, allocate_lanes
from vllm_kvevict.policies.params import resolve_budget
from vllm_kvevict.policies.plan import KeepPlan, LayerView
from vllm_kvevict.policies.pyramid import pyramid_budgets
from vllm_kvevict.policies.topk import candidate_positions, merge_kept, protected_positions, topk_per_head
from vllm_kvevict.policies.uniform import uniform_allocate


class EvictionPolicy:
    """Base class: evict once after prefill with uniform per-head budgets and plain top-k."""

    name: ClassVar[str] = "base"
    kind: ClassVar[str] = "evict"
    #: Compact after every this many prefill tokens instead of once after the prompt (0: once).
    eviction_chunk: int = 0
    #: The scorer reads each token's pre-RoPE q/k/v (LayerView.extra["qkv"]), captured as it is computed.
    needs_qkv: ClassVar[bool] = False

    def __init__(self, budget: int | float, params: dict[str, Any]):
        self.budget = budget
        self.params = dict(params)
        self.sink_tokens = int(self.params.get("sink_tokens", 0))
        self.min_prompt_len = int(self.params.get("min_prompt_len", 0))
        self.gqa_reduce = str(self.params.get("gqa_reduce", "mean"))
        self.allocator = "uniform"
        self.pyramid_beta: float | None = None
        self.floor_alpha = 0.0
        self.ada_mode = "exact"

    # ---- what the integration layer asks before building a view -------------------------------
    def query_window(self, num_tokens: int) -> int:
        """How many trailing prompt queries the scorer needs (0: none)."""
        return 0

    def recent_tokens(self, num_tokens: int) -> int:
        """Size of the protected recent window for a prompt of `num_tokens`."""
        return 0

    def tokens_per_head(self, num_tokens: int, layer: int = 0, num_layers: int = 1) -> int:
        """Average tokens kept per KV head at `layer` (for block accounting before any scoring)."""
        if num_tokens <= self.min_prompt_len:
            return num_tokens
        budget = resolve_budget(self.budget, num_tokens)
        if budget >= num_tokens:
            return num_tokens
        n_prot = protected_positions(num_tokens, self.sink_tokens, self.recent_tokens(num_tokens)).numel()
        base = max(budget, n_prot) - n_prot
        return n_prot + self._layer_base(base, num_tokens - n_prot, layer, num_layers)

    def max_tokens_per_head(self, num_tokens: int, num_layers: int = 1) -> int:
        """The largest per-head count any layer keeps (uniform allocation)."""
        return max(self.tokens_per_head(num_tokens, layer, num_layers) for layer in range(num_layers))

    # ---- the pipeline ----------------------------------------------------------------------------
    def score(self, view: LayerView) -> torch.Tensor:
        """Importance per KV head and token, [H_kv, T]; higher is kept first."""
        raise NotImplementedError

    def plan(self, view: LayerView) -> KeepPlan:
        """Which tokens each KV head keeps after the prompt has been prefilled."""
        num_tokens, num_heads = view.num_tokens, view.num_kv_heads
        if self.tokens_per_head(num_tokens, view.layer, view.num_layers) >= num_tokens:
            return KeepPlan.keep_all(num_heads, num_tokens)
        recent = self.recent_tokens(num_tokens)
        protected = protected_positions(num_tokens, self.sink_tokens, recent)
        candidates = candidate_positions(num_tokens, self.sink_tokens, recent)
        budget = resolve_budget(self.budget, num_tokens)
        base = max(budget, protected.numel()) - protected.numel()
        base = self._layer_base(base, candidates.numel(), view.layer, view.num_layers)
        cand_scores = self._candidate_scores(view, candidates)
        counts = self.allocate(cand_scores, base * num_heads)
        chosen = self.choose(cand_scores, counts, view)
        return KeepPlan(merge_kept(protected, candidates, chosen), num_tokens)

    def plan_rect(self, view: LayerView, region: int, keep: int) -> KeepPlan:
        """Exactly `keep` tokens per KV head among the first `region` positions (the paged path).

        vLLM's paged attention reads one contiguous length per request, so inside vLLM every head and
        layer keeps the same count: the compacted region of `keep` slots. Positions at or after
        `region` (the tail) are kept by the caller and are not part of the plan. Protected positions
        inside the region come first; the policy's scorer and selector fill the rest.
        """
        num_tokens, num_heads = view.num_tokens, view.num_kv_heads
        region = min(region, num_tokens)
        keep = min(keep, region)
        recent = self.recent_tokens(num_tokens)
        protected = protected_positions(num_tokens, self.sink_tokens, recent)
        protected = protected[protected < region]
        if protected.numel() >= keep:  # sinks first, then the latest protected positions
            sinks = protected[protected < self.sink_tokens]
            rest = protected[protected >= self.sink_tokens]
            chosen = torch.cat([sinks, rest.flip(0)])[:keep]
            return KeepPlan([torch.sort(chosen).values for _ in range(num_heads)], region)
        candidates = candidate_positions(num_tokens, self.sink_tokens, recent)
        candidates = candidates[candidates < region]
        cand_scores = self._candidate_scores(view, candidates)
        counts = uniform_allocate(num_heads, (keep - protected.numel()) * num_heads, candidates.numel())
        chosen = self.choose(cand_scores, counts, view)
        return KeepPlan(merge_kept(protected, candidates, chosen), region)

    def plan_lanes(self, view: LayerView, region: int, total_lanes: int, block_size: int) -> KeepPlan:
        """Ragged per-head plan for the head-lane layout (`vllm_kvevict.paged.lanes`): `total_lanes` lanes of
        `block_size` slots shared by the layer's KV heads, among the first `region` positions.

        Memory is paid in lanes, so the allocation is made in lanes: Ada-KV's global top-B over whole
        lanes (`adakv_allocate_lanes`), or an even split for uniform policies. Each head fills its lanes
        completely with its best tokens, so the region costs exactly `total_lanes` lanes and no slot is
        wasted. Protected positions inside the region are kept by every head.
        """
        num_tokens, num_heads = view.num_tokens, view.num_kv_heads
        region = min(region, num_tokens)
        if total_lanes * block_size >= region * num_heads:
            return KeepPlan([torch.arange(region) for _ in range(num_heads)], region)
        recent = self.recent_tokens(num_tokens)
        protected = protected_positions(num_tokens, self.sink_tokens, recent)
        protected = protected[protected < region]
        n_prot = protected.numel()
        candidates = candidate_positions(num_tokens, self.sink_tokens, recent)
        candidates = candidates[candidates < region]
        cand_scores = self._candidate_scores(view, candidates)
        if self.allocator == "ada":
            lanes = adakv_allocate_lanes(cand_scores, total_lanes, block_size, n_prot, self.floor_alpha)
        else:
            even = [total_lanes * block_size // num_heads] * num_heads
            lanes = allocate_lanes(even, total_lanes, block_size, region, min_lanes=1)
        keep = [min(candidates.numel(), max(0, min(n * block_size, region) - n_prot)) for n in lanes]
        chosen = self.choose(cand_scores, keep, view)
        return KeepPlan(merge_kept(protected, candidates, chosen), region)

    def _candidate_scores(self, view: LayerView, candidates: torch.Tensor) -> torch.Tensor:
        scores = self.score(view)
        expected = (view.num_kv_heads, view.num_tokens)
        if scores.shape != expected:
            raise RuntimeError(f"{self.name}: scorer returned {tuple(scores.shape)}, expected {expected}")
        return scores[:, candidates].float()

    def allocate(self, cand_scores: torch.Tensor, total: int) -> list[int]:
        num_heads, num_cand = cand_scores.shape
        if self.allocator == "ada":
            return adakv_allocate(cand_scores, total, self.floor_alpha, self.ada_mode)
        return uniform_allocate(num_heads, total, num_cand)

    def choose(self, cand_scores: torch.Tensor, counts: list[int], view: LayerView) -> list[torch.Tensor]:
        return topk_per_head(cand_scores, counts)

    def _layer_base(self, base: int, capacity: int, layer: int, num_layers: int) -> int:
        base = min(base, capacity)
        if self.pyramid_beta is None:
            return base
        return pyramid_budgets(base, num_layers, self.pyramid_beta, capacity)[layer]

    def describe(self) -> str:
        return f"{self.name}(budget={self.budget}, {', '.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"
