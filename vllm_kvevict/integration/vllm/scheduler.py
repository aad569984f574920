"""Scheduler side of eviction: return a compacted request's freed blocks to the pool.

A request's prompt is compacted after the step that finishes its prefill (for per-chunk eviction,
Trigger.PER_PREFILL_CHUNK, every step that ends a prefill chunk): the worker runs it before the next
step's forward (`core.compaction.compact_due`). When the next step is scheduled, this scheduler swaps
the request's blocks between the compacted region and the tail for the null block and returns them to
the BlockPool, the mechanism sliding window attention uses (`_remove_blocks_in_range`). Freed blocks go
to other requests at once, so more requests run concurrently: they write into them only in that next
forward, after the compaction has read them.

Preemption frees all of a request's blocks and recomputes it; the worker compacts it again, with
the same result (policies are deterministic), and it is freed again here. Both sides derive the
block counts from the request's plan (`core.requests`), worked out once per request.

With prefix caching on, compaction copies (`layout.Compaction.copied_row`): the step that reaches the
first compaction point gets n fresh blocks after the row's own, the worker writes the kept tokens
there, and before the next step this scheduler moves them to the front and hands the prompt's original
blocks back to the pool (hashed: a later request with the same prefix reads the full-fidelity KV).
When the pool has no n free blocks, a request whose leading blocks no one else holds is compacted in
place, and those blocks leave the prefix cache first; one that shares them waits for memory like any
request. Either way the request is hashed no further (its later KV is computed over the compacted
context), and a prefix-cache hit never covers the tokens its policy must compute to score
(`RequestPlan.cacheable_prefix`). A selecting request shares its KV up to its first
selecting context (`RequestPlan.shareable_prefix`): past it, its queries attended sparsely.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvevict.core.requests import PlanBook, server_config
from vllm_kvevict.integration.vllm.metrics import REPORT_ATTR, EvictionCounters, attach

logger = logging.getLogger("vllm_kvevict")
NEVER_HASHED = 1 << 62  # num_cached_block past any row's end: vLLM's cache_blocks hashes nothing more


class KVEvictScheduler(Scheduler):
    """vLLM's scheduler, plus freeing of the blocks compaction emptied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_server_config = server_config(self.vllm_config.additional_config)
        self.kv_block_size = self.cache_config.block_size
        self.kv_num_layers = self.vllm_config.model_config.get_total_num_hidden_layers()  # global layer ids, also under PP
        self.kv_plans = PlanBook(self.kv_server_config, self.kv_block_size, self.kv_num_layers,
                                 copy_on_compact=bool(self.cache_config.enable_prefix_caching))
        self.kv_freed: dict[str, int] = {}  # request id -> freed block count (compaction applied)
        self.kv_copied: set[str] = set()  # requests whose compaction 0 writes into fresh blocks
        self.kv_counters = EvictionCounters()
        if self.kv_plans.copy_on_compact:
            self._wrap_prefix_cache(self.kv_cache_manager)

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
        self.kv_copied.discard(request.request_id)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self.kv_freed.pop(request.request_id, None)
        self.kv_copied.discard(request.request_id)
        self.kv_plans.forget((request.request_id,))
        return super()._free_request(request, *args, **kwargs)

    # ---- copy-on-compact (prefix caching) -----------------------------------------------------------
    def _wrap_prefix_cache(self, manager) -> None:
        """Cap each request's prefix-cache hit, and give the step that reaches the first compaction point
        its n fresh blocks (instance attributes of this scheduler's KV cache manager, not class patches)."""
        find_hit, allocate = manager.get_computed_blocks, manager.allocate_slots

        def get_computed_blocks(request):
            blocks, hit, boundary = find_hit(request)
            plan = self.kv_plan(request)
            # a request too long to copy compacts in place: it shares nothing (and hashes nothing, see below)
            limit = 0 if self._too_long_to_copy(plan.compaction) else plan.cacheable_prefix
            if limit is not None and hit > limit:
                keep = limit // self.kv_block_size
                blocks = manager.create_kv_cache_blocks(tuple(group[:keep] for group in blocks.blocks))
                hit, boundary = keep * self.kv_block_size, min(boundary, keep * self.kv_block_size)
            return blocks, hit, boundary

        def allocate_slots(request, num_new_tokens, num_new_computed_tokens=0, **kwargs):
            plan = self.kv_plan(request)
            if plan.shareable_prefix is not None:  # a selecting request: its KV past that is its own
                new_blocks = allocate(request, num_new_tokens, num_new_computed_tokens, **kwargs)
                if new_blocks is not None:
                    self._unhash_past(request, plan.shareable_prefix // self.kv_block_size)
                return new_blocks
            comp = plan.compaction
            if self._too_long_to_copy(comp):
                self._stop_hashing(request, True)  # no other request may come to share what it overwrites
            start = request.num_computed_tokens
            reaches = comp is not None and start < comp.start <= start + num_new_computed_tokens + num_new_tokens
            if not reaches or not comp.copy_on_compact or self._too_long_to_copy(comp):
                return allocate(request, num_new_tokens, num_new_computed_tokens, **kwargs)
            # this step reaches the first compaction point: copy into n fresh blocks if the pool has them
            reserved = kwargs.pop("reserved_blocks", 0)
            new_blocks = allocate(request, num_new_tokens, num_new_computed_tokens,
                                  reserved_blocks=reserved + comp.kept_blocks, **kwargs)
            if new_blocks is not None:
                new_blocks = manager.create_kv_cache_blocks((list(new_blocks.blocks[0]) + self._append_fresh(request),))
            elif not self._shares_leading_blocks(request, comp, kwargs.get("new_computed_blocks")):
                new_blocks = allocate(request, num_new_tokens, num_new_computed_tokens, reserved_blocks=reserved,
                                      **kwargs)
                if new_blocks is not None:  # no room: in place, over blocks no one else reads
                    self._unhash_blocks(request, 0, comp.kept_blocks)
            self._stop_hashing(request, new_blocks)
            return new_blocks

        manager.get_computed_blocks = get_computed_blocks
        manager.allocate_slots = allocate_slots

    def _too_long_to_copy(self, comp) -> bool:
        """Copy-on-compact, but the worker's block row (max_model_len / block_size wide) has no room for the
        n fresh blocks after the prompt's: a prompt near the length limit compacts in place, sharing nothing."""
        width = -(-self.vllm_config.model_config.max_model_len // self.kv_block_size)
        return comp is not None and comp.copy_on_compact and comp.fresh_block + comp.kept_blocks > width

    @property
    def _block_manager(self):
        """The (only) attention group's block manager: its req_to_blocks, block pool and hash counts."""
        return self.kv_cache_manager.coordinator.single_type_managers[0]

    def _blocks_of(self, request) -> list:
        return self._block_manager.req_to_blocks.get(request.request_id, [])

    def _append_fresh(self, request) -> list:
        """The n fresh blocks compaction 0 writes into, after the row's own (`Compaction.fresh_block`)."""
        manager = self._block_manager
        blocks = manager.req_to_blocks[request.request_id]
        comp = self.kv_plan(request).compaction
        if len(blocks) != comp.fresh_block:
            raise RuntimeError(f"kvevict: {request.request_id} holds {len(blocks)} blocks at its compaction point, "
                               f"its plan says {comp.fresh_block}")
        fresh = manager.block_pool.get_new_blocks(comp.kept_blocks)
        blocks.extend(fresh)
        if manager._record_new_block_ids:
            manager.new_block_ids.extend(b.block_id for b in fresh)
        self.kv_copied.add(request.request_id)
        return fresh

    def _shares_leading_blocks(self, request, comp, hit_blocks) -> bool:
        """Whether another request holds one of the n blocks in-place compaction would overwrite."""
        held = self._blocks_of(request)[: comp.kept_blocks]
        hit = [] if hit_blocks is None else hit_blocks.blocks[0][: comp.kept_blocks - len(held)]
        return any(b.ref_cnt > 1 for b in held) or any(b.ref_cnt > 0 for b in hit)

    def _unhash_blocks(self, request, start: int, end: int) -> None:
        """Blocks [start, end) of the request's row leave the prefix cache (no later request finds them)."""
        pool = self._block_manager.block_pool
        for block in self._blocks_of(request)[start:end]:
            pool._maybe_evict_cached_block(block)

    def _unhash_past(self, request, shareable_blocks: int) -> None:
        """The request's blocks past its first `shareable_blocks` leave the prefix cache as soon as vLLM
        hashes them (before another request can look them up), and nothing more of it is hashed."""
        hashed = self._block_manager.num_cached_block.get(request.request_id, 0)
        if shareable_blocks < hashed < NEVER_HASHED:
            self._unhash_blocks(request, shareable_blocks, hashed)
            self._stop_hashing(request, True)

    def _stop_hashing(self, request, new_blocks) -> None:
        """From the compaction point on the request's KV is computed over the compacted context: none of it
        may be found by the prefix cache (vLLM hashes up to `num_cached_block`; this puts it past any end)."""
        if new_blocks is not None:
            self._block_manager.num_cached_block[request.request_id] = NEVER_HASHED

    def _release_prompt_blocks(self, request, comp, manager) -> None:
        """After copy-on-compact's compaction 0: the fresh blocks go to the front of the row, the prompt's
        own blocks back to the pool (the last ones first in line for eviction, as vLLM frees)."""
        blocks = manager.req_to_blocks[request.request_id]
        moved, originals = comp.copied_row(blocks, manager._null_block)
        blocks[:] = moved
        manager.block_pool.free_blocks(reversed(originals))

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
            manager = self._block_manager
            start = comp.freed_range(done + 1)[0]
            end = comp.freed_range(epoch)[1]
            if done < 0 and rid in self.kv_copied:
                self._release_prompt_blocks(request, comp, manager)
                start = comp.tail_block(0)
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
