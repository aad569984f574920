"""One engine step as the eviction core sees it: per batch row, which request it is and what its policy
does this step. Built by the worker from the runner's persistent batch just before the attention
metadata is built, read by the metadata builder and by every layer's attention in the same step.

A row's progress is measured in tokens whose KV exists (`num_computed`) and tokens computed in this
step (`num_scheduled`); against its plan's compaction points (vllm_kvevict/paged/layout.py):

    logical positions:  0 ............ num_computed ...... num_computed + num_scheduled
                                       [ this step's tokens ]
    a compaction point P in (num_computed, num_computed + num_scheduled]  ->  the row reaches P: this
    step's attention reads the full context; its layers are compacted before the next forward
    (`compaction.compact_due`), from which on it is `compacted` and attention reads the physical layout
    [compacted region | tail].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vllm_kvevict.core.requests import RequestPlan
from vllm_kvevict.policies.declaration import KeptLayout, Need


@dataclass(frozen=True)
class RowInfo:
    req_id: str
    num_computed: int  # tokens whose KV existed before this step
    num_scheduled: int  # tokens computed in this step
    prompt_len: int
    plan: RequestPlan
    num_blocks: int = 0  # blocks in the request's row this step

    @property
    def end(self) -> int:
        """Tokens whose KV exists after this step."""
        return self.num_computed + self.num_scheduled

    @property
    def epoch(self) -> int:
        """The layout attention reads this step (-1: logical, not compacted yet)."""
        comp = self.plan.compaction
        return -1 if comp is None else comp.epoch(self.num_computed)

    @property
    def compacted(self) -> bool:
        """Compaction already happened: attention must read the physical layout."""
        return self.epoch >= 0

    @property
    def target(self) -> int | None:
        """The next compaction point (the prompt's end, then decode-time points); None if there is none."""
        comp = self.plan.compaction
        return None if comp is None else comp.next_point(self.num_computed)

    @property
    def reaches_point(self) -> bool:
        """This step writes the KV at the compaction point: compacted before the next forward (`compact_due`)."""
        target = self.target
        return target is not None and self.num_computed < target <= self.end

    @property
    def copies_into_fresh(self) -> bool:
        """Copy-on-compact: this step's first compaction writes into the n fresh blocks the scheduler put
        after the row's own (it does when the pool has them; otherwise the row is compacted in place)."""
        comp = self.plan.compaction
        return (comp is not None and comp.copy_on_compact and self.reaches_point and self.target == comp.start
                and self.num_blocks >= comp.fresh_block + comp.kept_blocks)

    @property
    def reads_lanes(self) -> bool:
        """Compacted in the ragged head-lane layout: attention reads each head's lanes, then the tail."""
        return self.compacted and self.plan.declaration.layout is KeptLayout.HEAD_LANES

    @functools.cached_property  # asked by the builder and by every layer's attention in the step
    def selects(self) -> bool:
        """A selecting request with at least one query piece this step whose context selects."""
        return self.plan.selects and self.plan.policy.selects_within(self.num_computed, self.end)

    @functools.cached_property
    def selects_all(self) -> bool:
        """Every query piece of this step selects: no query of the row reads the full context."""
        if not self.selects:
            return False
        return all(self.plan.policy.selects(first) for first, _ in self.plan.policy.pieces(self.num_computed, self.end))

    @property
    def attention_replaced(self) -> bool:
        """The core computes this row's whole attention output (lanes, or selection for every query):
        the backend's own kernel need not read its context."""
        return self.reads_lanes or self.selects_all

    @property
    def scores_qkv(self) -> bool:
        """This step's tokens get scored from their pre-RoPE q/k/v (some will be compacted later)."""
        return self.target is not None and Need.PRE_ROPE_QKV in self.plan.declaration.needs

    @property
    def captures_window(self) -> bool:
        return self.target is not None and Need.WINDOW_QUERIES in self.plan.declaration.needs

    def window(self) -> tuple[int, int]:
        """Logical positions [first, last) of this step's queries the policy scores at the next point."""
        comp = self.plan.compaction
        policy = self.plan.policy
        target = self.target
        if target == comp.prompt_len:
            size = policy.query_window(self.prompt_len)
        else:  # decode-time: at most the queries since the previous point
            size = min(policy.query_window(target), target - comp.point(comp.epoch(target) - 1))
        return max(self.num_computed, target - size), min(self.end, target)


@dataclass(frozen=True)
class StepContext:
    rows: tuple[RowInfo, ...]
    num_layers: int

    @functools.cached_property
    def active(self) -> bool:
        """Some row compacts, reads a compacted layout, or selects: the core has work this step."""
        return any((r.plan.compaction is not None and not r.plan.compaction.is_noop) or r.selects for r in self.rows)

    @functools.cached_property  # asked by every layer's q/k/v hook in the step
    def needs_qkv(self) -> bool:
        """Some row scores this step's tokens from their pre-RoPE q/k/v."""
        return any(r.scores_qkv for r in self.rows)
