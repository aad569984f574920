"""Scheduler side of eviction: return a compacted request's freed blocks to the pool.

The worker compacts a request's prompt during the step that finishes its prefill (see backend.py).
Before the next step is scheduled, this scheduler swaps the request's blocks between the compacted
region and the tail for the null block and returns them to the BlockPool, the mechanism sliding
window attention uses (`_remove_blocks_in_range`). Freed blocks go to other requests at once, so
more requests run concurrently. Both sides derive the block counts from `settings.plan_for`.

Preemption frees all of a request's blocks and recomputes it; the worker compacts it again, with
the same result (policies are deterministic), and it is freed again here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvevict.integration.vllm.settings import plan_for, request_config, server_config

logger = logging.getLogger("vllm_kvevict")


@dataclass
class EvictionCounters:
    """Cumulative counts, by policy, reported through the scheduler stats."""

    evicted_tokens: dict[str, int] = field(default_factory=dict)
    freed_blocks: dict[str, int] = field(default_factory=dict)
    compactions: dict[str, int] = field(default_factory=dict)
    kept_ratios: list[tuple[str, float]] = field(default_factory=list)

    def add(self, policy: str, evicted: int, freed: int, ratio: float) -> None:
        self.evicted_tokens[policy] = self.evicted_tokens.get(policy, 0) + evicted
        self.freed_blocks[policy] = self.freed_blocks.get(policy, 0) + freed
        self.compactions[policy] = self.compactions.get(policy, 0) + 1
        self.kept_ratios.append((policy, ratio))


class KVEvictScheduler(Scheduler):
    """vLLM's scheduler, plus freeing of the blocks compaction emptied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_server_config = server_config(self.vllm_config.additional_config)
        self.kv_block_size = self.cache_config.block_size
        self.kv_num_layers = self.vllm_config.model_config.get_num_layers(self.vllm_config.parallel_config)
        self.kv_freed: dict[str, int] = {}  # request id -> freed block count (compaction applied)
        self.kv_counters = EvictionCounters()

    # ---- hooks -----------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self._free_compacted_blocks()
        return super().schedule(*args, **kwargs)

    def _preempt_request(self, request, *args, **kwargs):
        # all blocks go back to the pool; the recomputed prompt is compacted (and freed) again
        self.kv_freed.pop(request.request_id, None)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self.kv_freed.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    # ---- freeing -----------------------------------------------------------------------------------
    def _free_compacted_blocks(self) -> None:
        for request in self.running:
            rid = request.request_id
            if rid in self.kv_freed or request.num_computed_tokens < request.num_prompt_tokens:
                continue
            plan = self.kv_plan(request)
            comp = plan.compaction
            if comp is None or comp.is_noop:
                self.kv_freed[rid] = 0
                continue
            manager = self.kv_cache_manager.coordinator.single_type_managers[0]
            manager._remove_blocks_in_range(rid, comp.kept_blocks, comp.tail_start_block)
            self.kv_freed[rid] = comp.freed_blocks
            kept = comp.kept_tokens + (comp.prompt_len - comp.compactable_tokens)
            self.kv_counters.add(
                plan.config.policy,
                evicted=comp.prompt_len - kept,
                freed=comp.freed_blocks,
                ratio=kept / comp.prompt_len,
            )
            logger.debug("kvevict: %s freed %d blocks (%s)", rid, comp.freed_blocks, plan.config.policy)

    def kv_plan(self, request):
        config = request_config(self.kv_server_config, request.sampling_params.extra_args if request.sampling_params else None)
        return plan_for(config, request.num_prompt_tokens, self.kv_block_size, self.kv_num_layers)
