"""The eviction pipeline shared by every evicting policy: budget rule -> score -> allocate -> select.

A policy is a scorer (tokens -> scores per KV head), an allocator (budget per layer and head), and a
selector (top-k around protected sinks and a recent window). Subclasses override the pieces that
make their method (DESIGN.md section 4) and declare the rest as class data (`declaration.py`).
Nothing here knows about vLLM.

Budget semantics (`keep_budget`, the one rule every plan and the block layout use): `budget` is the
number of tokens each KV head keeps on average in every layer, protected tokens included. Protected
tokens always survive, so a budget below them keeps exactly the protected tokens. A budget >= the
prompt keeps everything. A pyramid policy moves the selectable part between layers, keeping the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvevict.policies.adakv import adakv_allocate, adakv_allocate_lanes, allocate_lanes
from vllm_kvevict.policies.base import Policy
from vllm_kvevict.policies.budget import resolve_budget
from vllm_kvevict.policies.declaration import Declaration, KeptLayout, LayerBudget, Need
from vllm_kvevict.policies.plan import KeepPlan, LayerView
from vllm_kvevict.policies.pyramid import pyramid_budgets
from vllm_kvevict.policies.topk import candidate_positions, merge_kept, protected_positions, topk_per_head
from vllm_kvevict.policies.uniform import uniform_allocate


@dataclass(frozen=True)
class KeepBudget:
    """What one layer of a prompt keeps per KV head: the protected positions, the candidates, and how
    many candidates each head keeps on average (`selectable`)."""

    protected: torch.Tensor
    candidates: torch.Tensor
    selectable: int

    @property
    def per_head(self) -> int:
        return self.protected.numel() + self.selectable


class EvictionPolicy(Policy):
    """Base class: evict once after prefill with uniform per-head budgets and plain top-k."""

    needs: ClassVar[frozenset[Need]] = frozenset()
    layout: ClassVar[KeptLayout] = KeptLayout.RECTANGULAR
    layer_budget: ClassVar[LayerBudget] = LayerBudget.UNIFORM
    #: how `allocate` splits a layer's slots over heads: "uniform" or "ada" (Ada-KV's global top-B)
    allocator: ClassVar[str] = "uniform"

    def __init__(self, budget: int | float, params):
        super().__init__(budget, params)
        self.sink_tokens = int(self.params.get("sink_tokens", 0))
        self.min_prompt_len = int(self.params.get("min_prompt_len", 0))
        self.gqa_reduce = str(self.params.get("gqa_reduce", "mean"))
        self.pyramid_beta = float(self.params.get("pyramid_beta", 20.0))
        self.floor_alpha = float(self.params.get("floor_alpha", 0.0))
        self.ada_mode = str(self.params.get("ada_mode", "exact"))
        self.prefill_chunk = 0  # PER_PREFILL_CHUNK policies: prompt tokens between compactions
        # re-compact the tail every this many generated tokens (0: never; a policy offers it by listing
        # params.decode_interval() in its param_specs)
        self.decode_interval = int(self.params.get("decode_interval", 0))

    def declare(self) -> Declaration:
        return Declaration(self.trigger, self.needs, self.layout, self.layer_budget, self.prefill_chunk,
                           self.decode_interval)

    # ---- the budget rule (what the block layout and every plan use) -------------------------------
    def query_window(self, num_tokens: int) -> int:
        """How many trailing prompt queries the scorer needs (Need.WINDOW_QUERIES)."""
        return 0

    def recent_tokens(self, num_tokens: int) -> int:
        """Size of the protected recent window for a prompt of `num_tokens`."""
        return 0

    def positions(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(protected, candidates): the positions every head keeps, and those open to eviction."""
        recent = self.recent_tokens(num_tokens)
        return (protected_positions(num_tokens, self.sink_tokens, recent),
                candidate_positions(num_tokens, self.sink_tokens, recent))

    def keep_budget(self, num_tokens: int, layer: int = 0, num_layers: int = 1) -> KeepBudget | None:
        """The layer's budget for a prompt of `num_tokens`, or None when it keeps everything."""
        if num_tokens <= self.min_prompt_len:
            return None
        budget = resolve_budget(self.budget, num_tokens)
        if budget >= num_tokens:
            return None
        protected, candidates = self.positions(num_tokens)
        base = min(max(budget, protected.numel()) - protected.numel(), candidates.numel())
        if self.layer_budget is LayerBudget.PYRAMID:
            base = pyramid_budgets(base, num_layers, self.pyramid_beta, candidates.numel())[layer]
        return KeepBudget(protected, candidates, base)

    def tokens_per_head(self, num_tokens: int, layer: int = 0, num_layers: int = 1) -> int:
        """Average tokens kept per KV head at `layer` (for block accounting before any scoring)."""
        rule = self.keep_budget(num_tokens, layer, num_layers)
        return num_tokens if rule is None else min(num_tokens, rule.per_head)

    def max_tokens_per_head(self, num_tokens: int, num_layers: int = 1) -> int:
        """The largest per-head count any layer keeps (the request holds that layer's blocks)."""
        return max(self.tokens_per_head(num_tokens, layer, num_layers) for layer in range(num_layers))

    # ---- the pipeline ----------------------------------------------------------------------------
    def score(self, view: LayerView) -> torch.Tensor:
        """Importance per KV head and token, [H_kv, T]; higher is kept first."""
        raise NotImplementedError

    def plan(self, view: LayerView) -> KeepPlan:
        """Which tokens each KV head keeps after the prompt has been prefilled (dense, per-head counts)."""
        num_tokens, num_heads = view.num_tokens, view.num_kv_heads
        rule = self.keep_budget(num_tokens, view.layer, view.num_layers)
        if rule is None or rule.per_head >= num_tokens:
            return KeepPlan.keep_all(num_heads, num_tokens)
        cand_scores = self._candidate_scores(view, rule.candidates)
        counts = self.allocate(cand_scores, rule.selectable * num_heads)
        chosen = self.choose(cand_scores, counts, view)
        return KeepPlan(merge_kept(rule.protected, rule.candidates, chosen), num_tokens)

    def plan_rect(self, view: LayerView, region: int, keep: int) -> KeepPlan:
        """Exactly `keep` tokens per KV head among the first `region` positions (KeptLayout.RECTANGULAR).

        vLLM's paged attention reads one contiguous length per request, so inside vLLM every head and
        layer keeps the same count: the compacted region of `keep` slots. Positions at or after
        `region` (the tail) are kept by the caller and are not part of the plan. Protected positions
        inside the region come first; the policy's scorer and selector fill the rest.
        """
        num_tokens, num_heads = view.num_tokens, view.num_kv_heads
        region = min(region, num_tokens)
        keep = min(keep, region)
        protected, candidates = self._region_positions(num_tokens, region)
        if protected.numel() >= keep:  # sinks first, then the latest protected positions
            sinks = protected[protected < self.sink_tokens]
            rest = protected[protected >= self.sink_tokens]
            chosen = torch.cat([sinks, rest.flip(0)])[:keep]
            return KeepPlan([torch.sort(chosen).values for _ in range(num_heads)], region)
        cand_scores = self._candidate_scores(view, candidates)
        counts = uniform_allocate(num_heads, (keep - protected.numel()) * num_heads, candidates.numel())
        chosen = self.choose(cand_scores, counts, view)
        return KeepPlan(merge_kept(protected, candidates, chosen), region)

    def plan_lanes(self, view: LayerView, region: int, total_lanes: int, block_size: int) -> KeepPlan:
        """Ragged per-head plan for the head-lane layout (KeptLayout.HEAD_LANES): `total_lanes` lanes of
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
        protected, candidates = self._region_positions(num_tokens, region)
        n_prot = protected.numel()
        cand_scores = self._candidate_scores(view, candidates)
        if self.allocator == "ada":
            lanes = adakv_allocate_lanes(cand_scores, total_lanes, block_size, n_prot, self.floor_alpha)
        else:
            even = [total_lanes * block_size // num_heads] * num_heads
            lanes = allocate_lanes(even, total_lanes, block_size, region, min_lanes=1)
        keep = [min(candidates.numel(), max(0, min(n * block_size, region) - n_prot)) for n in lanes]
        chosen = self.choose(cand_scores, keep, view)
        return KeepPlan(merge_kept(protected, candidates, chosen), region)

    def replan_lanes(self, view: LayerView, region: int, lengths: list[int]) -> KeepPlan:
        """Decode-time re-compaction in the head-lane layout: head h keeps exactly `lengths[h]` tokens
        among its positions below `region` (its lanes, padded to the longest head's, then the tail;
        `view.key_mask` marks the padding). Lane counts stay as the prompt's allocation made them, so
        the lanes stay full and the request's blocks do not change; only which tokens fill them does.
        Protected positions (sinks, the recent window) are kept first, then the best scores."""
        num_tokens, num_heads = view.num_tokens, view.num_kv_heads
        if len(lengths) != num_heads:
            raise ValueError(f"lengths has {len(lengths)} heads, the view {num_heads}")
        scores = self._checked_scores(view).float().cpu()
        real = torch.ones(num_heads, num_tokens, dtype=torch.bool) if view.key_mask is None else view.key_mask.cpu().clone()
        real[:, min(region, num_tokens):] = False
        protected, _ = self._region_positions(num_tokens, region)
        scores[:, protected] = float("inf")
        scores = scores.masked_fill(~real, float("-inf"))
        available = real.sum(dim=1)
        if bool((torch.tensor(lengths) > available).any()):
            raise ValueError(f"lengths {lengths} exceed the positions each head has ({available.tolist()})")
        return KeepPlan(topk_per_head(scores, lengths), num_tokens)  # ties: the earlier position

    def _region_positions(self, num_tokens: int, region: int) -> tuple[torch.Tensor, torch.Tensor]:
        protected, candidates = self.positions(num_tokens)
        return protected[protected < region], candidates[candidates < region]

    def _candidate_scores(self, view: LayerView, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates' scores [H_kv, N], on the host: scoring runs where the view is (the GPU on CUDA),
        allocation and selection (a few thousand numbers per head) on the CPU."""
        scores = self._checked_scores(view)
        return scores[:, candidates.to(scores.device)].float().cpu()

    def _checked_scores(self, view: LayerView) -> torch.Tensor:
        """The scorer's [H_kv, T] scores where the view is, their shape checked."""
        scores = self.score(view)
        expected = (view.num_kv_heads, view.num_tokens)
        if scores.shape != expected:
            raise RuntimeError(f"{self.name}: scorer returned {tuple(scores.shape)}, expected {expected}")
        return scores

    def allocate(self, cand_scores: torch.Tensor, total: int) -> list[int]:
        num_heads, num_cand = cand_scores.shape
        if self.allocator == "ada":
            return adakv_allocate(cand_scores, total, self.floor_alpha, self.ada_mode)
        return uniform_allocate(num_heads, total, num_cand)

    def choose(self, cand_scores: torch.Tensor, counts: list[int], view: LayerView) -> list[torch.Tensor]:
        return topk_per_head(cand_scores, counts)
