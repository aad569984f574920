"""Scheduler side of eviction: return a compacted request's freed blocks to the pool.

The worker compacts a request's prompt during the step that finishes its prefill (see backend.py),
or, for per-chunk eviction (Trigger.PER_PREFILL_CHUNK), in every step that ends a prefill chunk.
Before the next step is scheduled, this scheduler swaps the request's blocks between the compacted
region and the tail for the null block and returns them to the BlockPool, the mechanism sliding
window attention uses (`_remove_blocks_in_range`). Freed blocks go to other requests at once, so
more requests run concurrently.

Preemption frees all of a request's blocks and recomputes it; the worker compacts it again, with
the same result (policies are deterministic), and it is freed again here. Both sides derive the
block counts from the request's plan (`core.requests`), worked out once per request.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvevict.core.requests import PlanBook, server_config
from vllm_kvevict.integration.vllm.metrics import REPORT_ATTR, EvictionCounters, attach

logger = logging.getLogger("vllm_kvevict")


class KVEvictScheduler(Scheduler):
    """vLLM's scheduler, plus freeing of the blocks compaction emptied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_server_config = server_config(self.vllm_config.additional_config)
        self.kv_block_size = self.cache_config.block_size
        self.kv_num_layers = self.vllm_config.model_config.get_total_num_hidden_layers()  # global layer ids, also under PP
        self.kv_plans = PlanBook(self.kv_server_config, self.kv_block_size, self.kv_num_layers)
        self.kv_freed: dict[str, int] = {}  # request id -> freed block count (compaction applied)
        self.kv_counters = EvictionCounters()

    # ---- hooks -----------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self._free_compacted_blocks()
        return super().schedule(*args, **kwargs)

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        snapshot = self._kv_tokens() if stats is not None else None
        attach(stats, self.kv_counters.drain(snapshot))  # drained either way, so nothing piles up
        return stats

    def _kv_tokens(self) -> dict[str, list[int]]:
        """Per policy: [logical, physical] KV tokens of the running requests (physical: what the cache
        holds after compaction; selection frees nothing, so its physical equals its logical)."""
        out: dict[str, list[int]] = {}
        for request in self.running:
            plan = self.kv_plan(request)
            logical = request.num_computed_tokens
            comp = plan.compaction
            physical = logical if comp is None else comp.physical_len(logical)
            acc = out.setdefault(plan.config.policy, [0, 0])
            acc[0] += logical
            acc[1] += physical
        return out

    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        report = getattr(model_runner_output, REPORT_ATTR, None)  # selection counts, compaction times
        if report:
            self.kv_counters.add_worker_report(report)
        return super().update_from_output(scheduler_output, model_runner_output, *args, **kwargs)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        """A chunk of an evicting request never crosses a compaction point (the prompt's end, and for
        decode-time eviction every interval after it). Matters on recompute after preemption (prompt
        and generated tokens are prefilled again): each compaction runs where it ran the first time,
        so the generated tokens' KV is computed over the same compacted cache as before."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if num_new_tokens <= 1:
            return num_new_tokens
        comp = self.kv_plan(request).compaction
        point = comp.next_point(num_computed_tokens) if comp is not None else None
        if point is not None and point < num_computed_tokens + num_new_tokens:
            num_new_tokens = point - num_computed_tokens  # end the chunk at the compaction point
        return num_new_tokens

    def _preempt_request(self, request, *args, **kwargs):
        # all blocks go back to the pool; the recomputed prompt is compacted (and freed) again
        self.kv_freed.pop(request.request_id, None)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self.kv_freed.pop(request.request_id, None)
        self.kv_plans.forget((request.request_id,))
        return super()._free_request(request, *args, **kwargs)

    # ---- freeing -----------------------------------------------------------------------------------
    def _free_compacted_blocks(self) -> None:
        for request in self.running:
            rid = request.request_id
            plan = self.kv_plan(request)
            comp = plan.compaction
            if comp is None:
                continue
            epoch = comp.epoch(request.num_computed_tokens)
            done = self.kv_freed.get(rid, -1)
            if epoch <= done:
                continue
            manager = self.kv_cache_manager.coordinator.single_type_managers[0]
            start = comp.freed_range(done + 1)[0]
            end = comp.freed_range(epoch)[1]
            manager._remove_blocks_in_range(rid, start, end)
            self.kv_freed[rid] = epoch
            prompt_epoch = comp.epoch(comp.prompt_len)  # the compaction that ends the prompt's eviction
            for e in range(done + 1, epoch + 1):
                lo, hi = comp.freed_range(e)  # freed blocks were full: each evicted block_size tokens
                ratio = comp.physical_len(comp.prompt_len) / comp.prompt_len if e == prompt_epoch else None
                self.kv_counters.add(plan.config.policy, evicted=(hi - lo) * comp.block_size, freed=hi - lo,
                                     ratio=ratio)
            logger.debug("kvevict: %s epoch %d freed blocks [%d, %d) (%s)", rid, epoch, start, end, plan.config.policy)

    def kv_plan(self, request):
        extra = request.sampling_params.extra_args if request.sampling_params else None
        return self.kv_plans.get(request.request_id, extra, request.num_prompt_tokens)
