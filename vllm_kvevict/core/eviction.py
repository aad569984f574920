"""The backend-neutral eviction core: one step's plan, and what each attention layer does with it.

A backend's metadata builder calls `plan_step` once per step; it rewrites the batch's lengths and
block rows to the physical layout, notes the rows that reach a compaction point (`WorkerState.due`) and
returns the `StepPlan` every layer reads. A backend's attention impl owns one `LayerEviction` and calls
it around its own kernel:

    before_attention   keep the queries a policy scores with (Need.WINDOW_QUERIES), score this step's
                       tokens from their pre-RoPE q/k/v (Need.PRE_ROPE_QKV)
    backend kernel     attention over [compacted region | tail] for every row (the builder's rewrite);
                       rows whose output the core computes itself read only their own tokens
    after_attention    head-lane rows: attention over each head's lanes + tail (KeptLayout.HEAD_LANES);
                       selecting rows: attention over the selected positions (Trigger.PER_QUERY,
                       `selecting.py`)

A row that reaches a compaction point is compacted before the next step's forward, every layer at once
(`compaction.compact_due`, called by the integration): the step's own attention read the full context
anyway, so its first token goes out without waiting, and a request that ends there never compacts.
The next step's rewrite already reads the compacted layout; nothing touches the cache in between.

Every memory access goes through the layer's `CacheAdapter` (torch twins on CPU_ATTN, Triton kernels on
TRITON_ATTN). The core reads policies' declarations only; it never asks a policy's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvevict.core.adapter import CacheAdapter
from vllm_kvevict.core.selecting import selected_attention
from vllm_kvevict.core.state import DueCompaction, WorkerState
from vllm_kvevict.core.step import RowInfo, StepContext
from vllm_kvevict.paged.layout import physical_rows


@dataclass(frozen=True)
class LaneBatch:
    """The rows that read head-lanes this step, ready for one batched `lane_attention` per layer."""

    rows: tuple[int, ...]  # batch row indices
    lane_maps: torch.Tensor  # [B', num_layers, 2, H_kv] int32: (start lane, length) per head and layer
    tables: torch.Tensor  # [B', M] physical block rows: compacted blocks, then the tail's
    num_compacted: torch.Tensor  # [B'] blocks of each row's compacted region
    token_index: torch.Tensor  # [Nq] where each query token sits in the batch
    query_req: torch.Tensor  # [Nq] its row in `tables`
    query_pos: torch.Tensor  # [Nq] its position in the tail
    longest: int  # an upper bound of the tokens one query reads (lanes + tail), known on the host
    scratch: dict = field(default_factory=dict, compare=False)  # the adapter's step-wide memo (adapter.py)


@dataclass(frozen=True)
class StepPlan:
    """Attached to a step's attention metadata; read by every layer of the step."""

    step: StepContext
    query_start: list[int]  # batch row i's tokens are [query_start[i], query_start[i + 1])
    logical_tables: torch.Tensor | None  # the logical block table (selecting rows read it)
    lanes: LaneBatch | None


def plan_step(step: StepContext, query_start: list[int], seq_lens: torch.Tensor, block_table: torch.Tensor,
              state: WorkerState, out: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[StepPlan, torch.Tensor, torch.Tensor]:
    """The step's plan, and the physical (seq_lens, block_table) the backend's kernel must read.

    Compacted rows read n*bs + (L - C_e) positions from row[:n] + row[C_e/bs:] (paged/layout.py).
    Rows whose whole output the core computes (`RowInfo.attention_replaced`) are cut to their own
    tokens: the backend's kernel still runs over them, cheaply, and its output is overwritten.
    Everything stays on the tables' device (no host round trip); with `out`, the rewrite is written
    into those persistent buffers (at least as large as the batch), else into fresh tensors.
    """
    rows = step.rows
    for i, row in enumerate(rows):
        if row.reaches_point:  # compacted before the next forward, every layer (`compact_due`)
            state.due[row.req_id] = DueCompaction(row, block_table[i].clone())
            if row.copies_into_fresh:
                state.fresh_rows.add(row.req_id)
    logical_tables = block_table.clone() if any(row.selects for row in rows) else None
    new_lens, new_table = seq_lens, block_table
    changed = {i: _physical_len(row) for i, row in enumerate(rows) if row.compacted or row.attention_replaced}
    if changed:
        if out is None:
            new_lens, new_table = seq_lens.clone(), block_table.clone()
        else:
            new_lens, new_table = out[0][: len(rows)], out[1][: len(rows)]
            new_lens.copy_(seq_lens)
            new_table.copy_(block_table)
        index = torch.tensor(list(changed), device=seq_lens.device)
        new_lens[index] = torch.tensor(list(changed.values()), dtype=seq_lens.dtype).to(seq_lens.device)
        compacted = [i for i in changed if rows[i].compacted]
        if compacted:
            comps = [(rows[i].plan.compaction, rows[i].epoch) for i in compacted]
            kept = torch.tensor([c.kept_blocks for c, _ in comps])
            tail = torch.tensor([c.tail_block(e) for c, e in comps])
            where = torch.tensor(compacted, device=block_table.device)
            new_table[where] = physical_rows(block_table[where], kept, tail)
    lanes = _lane_batch(rows, query_start, new_table, state)
    return StepPlan(step, query_start, logical_tables, lanes), new_lens, new_table


def _physical_len(row: RowInfo) -> int:
    if row.attention_replaced:
        return row.num_scheduled
    return row.plan.compaction.physical_len(row.end, row.epoch)


def _lane_batch(rows: tuple[RowInfo, ...], query_start: list[int], tables: torch.Tensor,
                state: WorkerState) -> LaneBatch | None:
    picked = [i for i, row in enumerate(rows) if row.reads_lanes]
    if not picked:
        return None
    device = tables.device
    lane_maps = state.lanes.stacked([rows[i].req_id for i in picked]).to(device)
    heads = lane_maps.shape[-1]
    token_index, query_req, query_pos, longest = [], [], [], 0
    for b, i in enumerate(picked):
        row = rows[i]
        comp = row.plan.compaction
        tail_end = row.end - comp.tail_block(row.epoch) * comp.block_size
        token_index.append(torch.arange(query_start[i], query_start[i + 1]))
        query_req.append(torch.full((row.num_scheduled,), b))
        query_pos.append(torch.arange(tail_end - row.num_scheduled, tail_end))
        longest = max(longest, min(comp.kept_tokens * heads, comp.compactable_tokens) + tail_end)
    return LaneBatch(
        rows=tuple(picked),
        lane_maps=lane_maps,
        tables=tables[picked],
        num_compacted=torch.tensor([rows[i].plan.compaction.kept_blocks for i in picked], device=device),
        token_index=torch.cat(token_index).to(device),
        query_req=torch.cat(query_req).to(device),
        query_pos=torch.cat(query_pos).to(device),
        longest=longest,
    )


class LayerEviction:
    """What one attention layer does for the eviction core (one instance per layer, per worker)."""

    def __init__(self, layer: int, adapter: CacheAdapter, scale: float, state: WorkerState):
        self.layer = layer
        self.adapter = adapter
        self.scale = scale
        self.state = state

    # ---- before the backend's kernel ------------------------------------------------------------------
    def before_attention(self, plan: StepPlan, query: torch.Tensor) -> None:
        self._capture_queries(plan, query)
        self._score_tokens(plan)

    def _capture_queries(self, plan: StepPlan, query: torch.Tensor) -> None:
        for i, row in enumerate(plan.step.rows):
            if row.target is None:
                continue
            if row.num_computed == 0:
                self.state.restart(row.req_id, self.layer)  # a fresh (or recomputed) prefill
            if not row.captures_window:
                continue
            first, last = row.window()
            if first < last:
                base = plan.query_start[i] - row.num_computed
                self.state.queries.add(row.req_id, self.layer, first, query[base + first : base + last].detach().clone())

    def _score_tokens(self, plan: StepPlan) -> None:
        """Need.PRE_ROPE_QKV: score this step's tokens that a later compaction chooses among, from their
        pre-RoPE q/k/v (captured by the worker's hook on this layer's qkv projection)."""
        if not plan.step.needs_qkv:
            return
        qkv = self.state.qkv.pop(self.layer, None)
        if qkv is None:
            raise RuntimeError(
                f"layer {self.layer}: no pre-RoPE q/k/v was captured for a request whose policy needs it; it "
                "needs a decoder whose layers have a fused self_attn.qkv_proj and eager execution")
        for i, row in enumerate(plan.step.rows):
            if not row.scores_qkv:
                continue
            first, last = row.num_computed, min(row.end, row.plan.compaction.last_point)
            if first < last:
                base = plan.query_start[i] - row.num_computed
                scores = row.plan.policy.token_scores(self.layer, qkv[base + first : base + last])
                self.state.scores.add(row.req_id, self.layer, first, scores)

    # ---- after the backend's kernel -------------------------------------------------------------------
    def after_attention(self, plan: StepPlan, query: torch.Tensor, kv_cache: torch.Tensor,
                        output: torch.Tensor) -> None:
        keys, values = self.adapter.views(kv_cache)
        out = output.view(-1, query.shape[1], query.shape[2])
        if plan.lanes is not None:
            self._lane_attention(plan.lanes, query, keys, values, out)
        if plan.logical_tables is not None:
            selected_attention(self, plan, query, keys, values, out)

    def _lane_attention(self, lanes: LaneBatch, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        out: torch.Tensor) -> None:
        """Rows compacted in the head-lane layout: attention over each head's own lanes + the tail, for all
        of them in one call (the backend's kernel only read their own tokens)."""
        q = query[lanes.token_index]
        out[lanes.token_index] = self.adapter.lane_attention(q, keys, values, lanes, self.layer, self.scale).to(out.dtype)
