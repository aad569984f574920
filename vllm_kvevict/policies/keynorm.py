"""Key-norm eviction ("Knorm"; Devoto et al., arXiv 2406.11430): keep the keys with the smallest L2 norm.

Across layers and heads, a key's L2 norm correlates negatively with the attention it receives, so a
low-norm key is worth keeping. The score needs no query and no attention: the cheapest scorer known,
and a query-agnostic baseline for the observation-window policies. Per KV head, score = -||k||_2 over
head_dim (keys as cached, RoPE applied; a rotation leaves the norm unchanged). The last
`recent_tokens` of the prompt (where the question usually is) and the first `sink_tokens` are kept.

Shapes: view.keys [H_kv, T, D] -> scores [H_kv, T].
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.params import MAX_TOKENS, MIN_PROMPT_LEN, Param, decode_interval, sink_tokens
from vllm_kvevict.policies.plan import LayerView


class KeyNorm(EvictionPolicy):
    name = "keynorm"
    description = "smallest key L2 norm per head, query-agnostic (Knorm); once after prefill"
    param_specs = (
        sink_tokens(0), MIN_PROMPT_LEN,
        Param("recent_tokens", int, 32, "last prompt tokens always kept (the question)", 0, MAX_TOKENS),
        decode_interval(),
    )

    def recent_tokens(self, num_tokens: int) -> int:
        return min(int(self.params["recent_tokens"]), num_tokens)

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
