"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus a recent window.

No scoring: keep the first `sink_tokens` tokens and the most recent ones, budget - sinks of them.
Shapes: view.keys [H_kv, T, D]; every head keeps the same positions.
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.budget import resolve_budget
from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.params import MIN_PROMPT_LEN, decode_interval, sink_tokens
from vllm_kvevict.policies.plan import LayerView


class StreamingLLM(EvictionPolicy):
    name = "streamingllm"
    description = "attention sinks + recent window"
    param_specs = (sink_tokens(4), MIN_PROMPT_LEN, decode_interval())

    def recent_tokens(self, num_tokens: int) -> int:
        budget = resolve_budget(self.budget, num_tokens)
        return max(0, budget - self.sink_tokens)

    def score(self, view: LayerView) -> torch.Tensor:
        # recency: after the prompt, sinks + window fill the budget and nothing else survives; when the
        # tail is re-compacted during decode (decode_interval), the latest tokens of the region are kept
        return torch.arange(view.num_tokens, dtype=torch.float32).expand(view.num_kv_heads, -1)
