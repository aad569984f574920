"""VATP, value-aware token pruning (Guo et al., arXiv 2406.12335): attention x ||v||_1.

Importance I_k = S_k * ||v_k||_1, where S_k is the attention token k receives and ||v_k||_1 the L1
norm of its value vector (per KV head). Half of each head's kept tokens are picked by I pooled along
tokens like SnapKV's scores (max over the 11 tokens up to each: a retrieved number kept whole), half by I
itself, the paper's score (`pool_share: 0.5`, `attention.share_ranks`): pooled only kept every needle but
lost greedy agreement with the full cache, unpooled the reverse (docs/results.md, pool_share ablation);
`pooling: none` is the paper's. Sinks are always kept, because their values are
small and the product would otherwise evict them. Two attention modes:
  window      mean attention of the last `window` prompt queries (the reference's Scissorhands mode)
  accumulate  attention summed over all prompt queries (the reference's H2O mode)
During decode the running score grows by each step's attention (`accumulate_step`); the integration
re-compacts when the tail has grown by `decode_interval` tokens.

Shapes: view.queries [H_q, W, D], view.keys/values [H_kv, T, D] -> scores [H_kv, T].
GQA: the source is MHA-only; we average attention over each query group, then weight by the KV
head's value norm (the group-wise aggregation the paper names as future work).
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.attention import pool_before_recent, share_ranks, window_attention
from vllm_kvevict.policies.declaration import Need
from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.gqa import reduce_groups
from vllm_kvevict.policies.params import (
    GQA_REDUCE, KERNEL_SIZE, MIN_PROMPT_LEN, POOL_ALIGN, Param, decode_interval, pool_share, pooling, sink_tokens,
    window)
from vllm_kvevict.policies.plan import LayerView


def value_l1_norm(values: torch.Tensor) -> torch.Tensor:
    """||v||_1 over head_dim: values [H_kv, T, D] -> [H_kv, T]."""
    return values.float().abs().sum(dim=-1)


def value_aware_importance(attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """I = S * ||v||_1 with S [H_kv, T] (attention received) and values [H_kv, T, D]."""
    return attention.float() * value_l1_norm(values)


class VATP(EvictionPolicy):
    name = "vatp"
    description = "attention x value L1 norm, sinks protected; after prefill and during decode"
    param_specs = (
        window(), GQA_REDUCE, MIN_PROMPT_LEN, sink_tokens(20),  # [EXT] README: sink_len 20
        Param("vatp_mode", str, "window", "attention over the window (Scissorhands) or all queries (H2O)",
              choices=("window", "accumulate")),
        # not in the paper: SnapKV's pooling of the importance (docs/results.md, pooling ablation: needles
        # at 1/8 and 1/4 of a 2K prompt 0 -> the full cache's); `pooling: none` restores the paper
        pooling("max"), KERNEL_SIZE, POOL_ALIGN, pool_share(0.5),
        decode_interval(128),
    )
    needs = frozenset({Need.WINDOW_QUERIES, Need.VALUES})

    def __init__(self, budget, params):
        super().__init__(budget, params)
        self.window = int(self.params["window"])
        self.mode = str(self.params["vatp_mode"])
        self.pooling = str(self.params.get("pooling", "max"))
        self.kernel_size = int(self.params.get("kernel_size", KERNEL_SIZE.default))
        self.pool_align = str(self.params.get("pool_align", POOL_ALIGN.default))
        self.pool_share = float(self.params["pool_share"])

    def query_window(self, num_tokens: int) -> int:
        return num_tokens if self.mode == "accumulate" else min(self.window, num_tokens)

    def recent_tokens(self, num_tokens: int) -> int:
        return min(self.window, num_tokens)

    def attention_received(self, view: LayerView) -> torch.Tensor:
        """S per KV head [H_kv, T]: summed (accumulate) or averaged (window) over the queries."""
        if view.queries is None:
            raise ValueError(f"vatp needs prompt queries (mode {self.mode!r}); view.queries is None")
        probs = window_attention(view.queries, view.keys, query_start=view.query_start)
        per_q = probs.sum(dim=1) if self.mode == "accumulate" else probs.mean(dim=1)
        return reduce_groups(per_q, view.num_kv_heads, self.gqa_reduce)

    def score(self, view: LayerView) -> torch.Tensor:
        running = view.extra.get("running_attention")
        attention = running if running is not None else self.attention_received(view)
        importance = value_aware_importance(attention, view.values)
        if self.pooling == "none":
            return importance  # the paper's score: nothing to share
        pooled = pool_before_recent(importance, self.recent_tokens(view.num_tokens), self.kernel_size, self.pooling,
                                    self.pool_align)
        return share_ranks(pooled, importance, self.pool_share)

    def accumulate_step(self, running: torch.Tensor, step_probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Add one decode step's attention [H_q, N] to the running per-KV-head sum [H_kv, N']."""
        step = reduce_groups(step_probs.float(), num_kv_heads, self.gqa_reduce)
        if step.shape[1] > running.shape[1]:  # tokens appended since the last step start at zero
            running = torch.nn.functional.pad(running, (0, step.shape[1] - running.shape[1]))
        return running + step
