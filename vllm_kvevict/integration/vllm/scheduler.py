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

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvevict.integration.vllm.metrics import EvictionCounters, attach
from vllm_kvevict.integration.vllm.settings import request_plan, server_config

logger = logging.getLogger("vllm_kvevict")


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

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        attach(stats, self.kv_counters.drain())  # drained either way, so nothing piles up
        return stats

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        """A chunk of an evicting request never crosses its prompt's end. Matters on recompute after
        preemption (prompt and generated tokens are prefilled again): the prompt is compacted first,
        so the generated tokens' KV is computed over the compacted prompt, as it was the first time."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        prompt_len = request.num_prompt_tokens
        if num_computed_tokens < prompt_len < num_computed_tokens + num_new_tokens:
            comp = self.kv_plan(request).compaction
            if comp is not None and not comp.is_noop:
                num_new_tokens = prompt_len - num_computed_tokens
        return num_new_tokens

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
        extra = request.sampling_params.extra_args if request.sampling_params else None
        return request_plan(self.kv_server_config, extra, request.num_prompt_tokens, self.kv_block_size, self.kv_num_layers)
