"""What a policy declares about itself: the data the eviction core reads instead of a policy's name.

    when it acts      Trigger: once after the prompt, after every prefill chunk, or per query (selecting);
                      plus `decode_interval`: re-compact the tail every N generated tokens (0: never)
    what it needs     Need: the observation window's queries, each token's pre-RoPE q/k/v, the values, or nothing
    how it keeps      KeptLayout: every KV head the same count in the same slots (rectangular), or
                      ragged per-head counts in head-lanes (vllm_kvevict/paged/lanes.py)
    per-layer budget  LayerBudget: the same in every layer, or a pyramid (the request holds the largest)

The core plans every step from these and from the policy's budget rule (`tokens_per_head`); a new policy
that fits them is served without touching the core. Pure stdlib.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Trigger(str, enum.Enum):
    AFTER_PREFILL = "after_prefill"  # compact once, when the prompt's KV is complete
    PER_PREFILL_CHUNK = "per_prefill_chunk"  # compact after every `prefill_chunk` prompt tokens (Locret)
    PER_QUERY = "per_query"  # select for every query over the whole cache; nothing is evicted (TokenSelect)


class Need(str, enum.Enum):
    # The last `query_window(T)` prompt queries (RoPE applied), captured while the prompt is prefilled
    # and handed to `score()` in LayerView.queries at the compaction.
    WINDOW_QUERIES = "window_queries"
    # Each token's pre-RoPE q/k/v, scored by `token_scores()` as the token is computed; at each compaction
    # `run_scores()` scores the run since the last one from them (so that steps do not matter), the
    # scores are remembered with the kept tokens and `retain()` chooses. Read through a module
    # hook on the qkv projection, so the model must run eagerly.
    PRE_ROPE_QKV = "pre_rope_qkv"
    # The dense values in LayerView.values (a scorer that weights by them); without it the view has none
    # and the core gathers no value to score.
    VALUES = "values"


class KeptLayout(str, enum.Enum):
    RECTANGULAR = "rectangular"  # every KV head keeps the same number of tokens (its own ones)
    HEAD_LANES = "head_lanes"  # ragged per-head counts, packed in head-lanes (Ada-KV)
    UNCHANGED = "unchanged"  # nothing is moved or freed (selection)


class LayerBudget(str, enum.Enum):
    UNIFORM = "uniform"  # every layer keeps the same tokens per head
    PYRAMID = "pyramid"  # lower layers keep more; the request holds the largest layer's blocks


@dataclass(frozen=True)
class Declaration:
    trigger: Trigger
    needs: frozenset[Need] = frozenset()
    layout: KeptLayout = KeptLayout.RECTANGULAR
    layer_budget: LayerBudget = LayerBudget.UNIFORM
    prefill_chunk: int = 0  # PER_PREFILL_CHUNK: prompt tokens between compactions
    decode_interval: int = 0  # generated tokens the tail may grow before it is re-compacted (0: never)

    def __post_init__(self) -> None:
        if (self.trigger is Trigger.PER_PREFILL_CHUNK) != (self.prefill_chunk > 0):
            raise ValueError(f"prefill_chunk={self.prefill_chunk} goes with trigger {Trigger.PER_PREFILL_CHUNK.value}")
        if self.selects and (self.layout is not KeptLayout.UNCHANGED or self.decode_interval):
            raise ValueError("a selecting policy keeps the cache unchanged and never compacts")
        if self.decode_interval < 0:
            raise ValueError(f"decode_interval={self.decode_interval} must be >= 0")

    @property
    def selects(self) -> bool:
        return self.trigger is Trigger.PER_QUERY

    @property
    def layers_differ(self) -> bool:
        """Layers keep different counts; all share the request's block row, which holds the largest."""
        return self.layer_budget is not LayerBudget.UNIFORM

    @property
    def kind(self) -> str:
        """'select' (nothing freed) or 'evict' (the policy's kind in listings and configs)."""
        return "select" if self.selects else "evict"

    def __contains__(self, need: Need) -> bool:
        return need in self.needs
