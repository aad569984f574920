"""SnapKV (Li et al., arXiv 2404.14469) and its PyramidKV / Ada-KV variants.

Score: attention of the last `window` prompt queries (the observation window) over the prompt,
averaged over the window, max-pooled along tokens, reduced over each GQA group (mean). The paper pools
with a centred kernel of 7; the default here pools 11 tokens *following* each hit (`pool_align: follow`),
so a value the question retrieves is kept whole: on the needle tasks at 1/8 and 1/4 of a 2K prompt that
took snapkv and ada-snapkv from 0 to the full cache's accuracy (docs/results.md, the pool_align ablation).
`kernel_size: 7, pool_align: center` restores the paper's scoring.
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
from vllm_kvevict.policies.gqa import reduce_groups
from vllm_kvevict.policies.params import (
    GQA_REDUCE, KERNEL_SIZE, MIN_PROMPT_LEN, POOL_ALIGN, POOLING, VALUE_WEIGHT, decode_interval, sink_tokens, window)
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.pyramid import PYRAMID_BETA

SNAP_PARAMS = (window(), KERNEL_SIZE, POOLING, POOL_ALIGN, VALUE_WEIGHT, GQA_REDUCE, MIN_PROMPT_LEN, sink_tokens(0))


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
        scores = probs.mean(dim=1)  # [H_q, T]
        if self.value_weight == "norm":
            norms = view.values.float().norm(dim=-1).to(scores.device)  # [H_kv, T]
            scores = scores * norms.repeat_interleave(scores.shape[0] // view.num_kv_heads, dim=0)
        scores = pool_before_recent(scores, window, self.kernel_size, self.pooling, self.pool_align)
        return reduce_groups(scores, view.num_kv_heads, self.gqa_reduce)


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
