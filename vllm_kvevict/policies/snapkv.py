"""SnapKV (Li et al., arXiv 2404.14469) and its PyramidKV / Ada-KV variants.

Score: attention of the last `window` prompt queries (the observation window) over the prompt,
aggregated over the window, max-pooled along tokens, reduced over each GQA group (mean). The paper
averages over the window and pools with a centred kernel of 7. The defaults here differ twice, each an
ablation in docs/results.md:
  pool_align: follow, kernel 11   pool the 11 tokens *following* each hit, so a value the question
                                  retrieves is kept whole (needles at 1/8 and 1/4 of 2K: 0 -> the full cache's)
  window_reduce: max              a token scores the most any window query gives it, floored at that
                                  maximum's mean (DefensiveKV, arXiv 2510.13334): a value only one query
                                  reads is not averaged away (the last of four listed values came back)
`kernel_size: 7, pool_align: center, window_reduce: mean` restores the paper's scoring.
The window itself is always kept. Variants change only the allocator:
  snapkv         uniform per head
  pyramidkv      uniform per head, per-layer pyramid schedule (Cai et al., 2024)
  ada-snapkv     Ada-KV adaptive per-head budgets (Feng et al., arXiv 2407.11550)
  ada-pyramidkv  pyramid per layer, Ada-KV per head

Shapes: view.queries [H_q, W, D], view.keys [H_kv, T, D] -> scores [H_kv, T].
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.policies.adakv import ADA_MODE, FLOOR_ALPHA
from vllm_kvevict.policies.attention import pool_before_recent, window_attention
from vllm_kvevict.policies.declaration import Declaration, KeptLayout, LayerBudget, Need
from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.gqa import expand_kv, reduce_groups
from vllm_kvevict.policies.params import (
    GQA_REDUCE, KERNEL_SIZE, MIN_PROMPT_LEN, POOL_ALIGN, POOLING, VALUE_WEIGHT, WINDOW_REDUCE, decode_interval,
    sink_tokens, window)
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.pyramid import PYRAMID_BETA

SNAP_PARAMS = (window(), KERNEL_SIZE, POOLING, POOL_ALIGN, WINDOW_REDUCE, VALUE_WEIGHT, GQA_REDUCE, MIN_PROMPT_LEN,
               sink_tokens(0))


class SnapKV(EvictionPolicy):
    name = "snapkv"
    description = "observation-window attention, max-pooled, uniform per head; once after prefill"
    param_specs = SNAP_PARAMS + (decode_interval(),)
    needs = frozenset({Need.WINDOW_QUERIES})

    def __init__(self, budget, params):
        super().__init__(budget, params)
        self.window = int(self.params.get("window", 32))
        self.kernel_size = int(self.params.get("kernel_size", KERNEL_SIZE.default))
        self.pooling = str(self.params.get("pooling", "max"))
        self.pool_align = str(self.params.get("pool_align", POOL_ALIGN.default))
        self.value_weight = str(self.params.get("value_weight", VALUE_WEIGHT.default))
        self.window_reduce = str(self.params.get("window_reduce", WINDOW_REDUCE.default))

    def declare(self) -> Declaration:
        decl = super().declare()
        if self.value_weight != "norm":
            return decl
        return dataclasses.replace(decl, needs=decl.needs | {Need.VALUES})  # scores weighted by ||v||

    def query_window(self, num_tokens: int) -> int:
        return min(self.window, num_tokens)

    def recent_tokens(self, num_tokens: int) -> int:
        return min(self.window, num_tokens)

    def score(self, view: LayerView) -> torch.Tensor:
        if view.queries is None:
            raise ValueError(f"{self.name} needs the last {self.window} prompt queries (view.queries is None)")
        probs = window_attention(view.queries, view.keys, query_start=view.query_start, key_mask=view.key_mask)
        window = probs.shape[1]
        scores = probs.mean(dim=1) if self.window_reduce == "mean" else _defensive(probs, window, view.key_mask)
        if self.value_weight == "norm":
            norms = view.values.float().norm(dim=-1).to(scores.device)  # [H_kv, T]
            scores = scores * expand_kv(norms, scores.shape[0] // view.num_kv_heads)
        scores = pool_before_recent(scores, window, self.kernel_size, self.pooling, self.pool_align)
        return reduce_groups(scores, view.num_kv_heads, self.gqa_reduce)


def _defensive(probs: torch.Tensor, window: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """DefensiveKV's aggregation (Feng et al., arXiv 2510.13334) of probs [H_q, W, T]: a token scores the most
    any window query gives it (a token one query needs is not averaged away by the others), and no token
    before the window scores below that maximum's mean over them (the prior: with little evidence, tokens
    tie). A head-lane view's padding (`key_mask` False) stays at 0 and takes no part in the mean."""
    worst = probs.amax(dim=1)  # [H_q, T]
    cut = worst.shape[1] - window
    if key_mask is None:
        return torch.maximum(worst, worst[:, :cut].mean(dim=1, keepdim=True))
    real = expand_kv(key_mask.to(worst.device), worst.shape[0] // key_mask.shape[0])  # [H_q, T]
    counted = real[:, :cut]
    floor = (worst[:, :cut] * counted).sum(dim=1, keepdim=True) / counted.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(real, torch.maximum(worst, floor), worst)


class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "snapkv with a pyramid per-layer budget schedule"
    param_specs = SNAP_PARAMS + (PYRAMID_BETA, decode_interval())
    layer_budget = LayerBudget.PYRAMID


class AdaSnapKV(SnapKV):
    name = "ada-snapkv"
    description = "snapkv scores + Ada-KV adaptive per-head budgets (ragged heads)"
    param_specs = SNAP_PARAMS + (FLOOR_ALPHA, ADA_MODE, decode_interval())
    layout = KeptLayout.HEAD_LANES
    allocator = "ada"


class AdaPyramidKV(AdaSnapKV):
    name = "ada-pyramidkv"
    description = "pyramid layer schedule + Ada-KV adaptive per-head budgets"
    param_specs = SNAP_PARAMS + (PYRAMID_BETA, FLOOR_ALPHA, ADA_MODE, decode_interval())
    layer_budget = LayerBudget.PYRAMID
