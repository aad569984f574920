"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus a recent window.

No scoring: keep the first `sink_tokens` tokens and the most recent ones, budget - sinks of them.
Shapes: view.keys [H_kv, T, D]; every head keeps the same positions.
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.budget import resolve_budget
from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.params import MIN_PROMPT_LEN, sink_tokens
from vllm_kvevict.policies.plan import LayerView


class StreamingLLM(EvictionPolicy):
    name = "streamingllm"
    description = "attention sinks + recent window"
    param_specs = (sink_tokens(4), MIN_PROMPT_LEN)

    def recent_tokens(self, num_tokens: int) -> int:
        budget = resolve_budget(self.budget, num_tokens)
        return max(0, budget - self.sink_tokens)

    def score(self, view: LayerView) -> torch.Tensor:
        # everything outside sinks + window is evicted; scores only need to exist
        return torch.zeros(view.num_kv_heads, view.num_tokens)
