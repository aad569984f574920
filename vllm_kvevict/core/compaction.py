"""Compaction of one request's layer, at compaction point P_k, over the layout of epoch k - 1.

A step that reaches P_k notes it (`WorkerState.due`); `compact_due` runs those compactions, every layer,
before the next step's forward reads or writes the cache (blocks the scheduler freed meanwhile are
written by no one before that forward).

    epoch k-1 physical row:  [ compacted region (n blocks) | tail blocks since C_(k-1) ... ]   (k = 0: the
                             logical prompt row)
    region                   the first `region` physical positions: everything up to the new tail C_k
    the policy chooses       n*bs tokens per KV head among the region (or ragged counts, in lanes)
    moved                    to the region's leading blocks, in place, through the adapter (copy-on-compact:
                             compaction 0 writes into the fresh blocks instead, `layout.Compaction.copied_row`)

How the policy chooses comes from its declaration: Need.PRE_ROPE_QKV policies by the scores remembered
with the kept tokens and those computed since (`retain`); the others from a dense view of the region
and the captured window queries (`plan_rect`, or `plan_lanes` for KeptLayout.HEAD_LANES; at decode-time
points a head-lane request keeps each head's lane count and refills its lanes, `replan_lanes`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from vllm_kvevict.core.step import RowInfo
from vllm_kvevict.paged.compact import rect_addresses
from vllm_kvevict.paged.lanes import LaneMap, lane_candidates, pack_addresses, refill_addresses
from vllm_kvevict.paged.layout import layer_lanes, physical_rows
from vllm_kvevict.policies.declaration import KeptLayout, Need
from vllm_kvevict.policies.plan import LayerView

if TYPE_CHECKING:
    from vllm_kvevict.core.eviction import LayerEviction
    from vllm_kvevict.core.state import WorkerState


def compact_due(state: WorkerState, layers: Iterable[tuple[LayerEviction, torch.Tensor]], num_layers: int) -> None:
    """Every compaction the last step's rows reached, in each (layer, its KV cache tensor) of this worker."""
    if not state.due:
        return
    due = list(state.due.values())
    state.due.clear()
    for layer, kv_cache in layers:
        keys, values = layer.adapter.views(kv_cache)
        for entry in due:
            compact_layer(layer, entry.row, entry.table, keys, values, num_layers)


def compact_layer(layer: LayerEviction, row: RowInfo, table: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, num_layers: int) -> None:
    """Compact `row` in `layer` at its next point; `table` is its logical block row."""
    start = time.perf_counter()
    comp = row.plan.compaction
    target = row.target
    k = comp.epoch(target)
    prev = k - 1
    physical_row = table if prev < 0 else physical_rows(
        table[None], torch.tensor([comp.kept_blocks]), torch.tensor([comp.tail_block(prev)]))[0]
    region = comp.physical_len(comp.tail_block(k) * comp.block_size, prev)
    into = None
    if row.copies_into_fresh:  # the prompt's blocks stay as they are, for the prefix cache
        into = table[comp.fresh_block : comp.fresh_block + comp.kept_blocks]
    decl = row.plan.declaration
    if Need.PRE_ROPE_QKV in decl.needs:
        kept = _retained(layer, row, k, region)
        layer.adapter.move_tokens(keys, values, *rect_addresses(physical_row, kept, comp.block_size, into))
        _log(layer, row, list(kept), k)
    elif decl.layout is KeptLayout.HEAD_LANES and k > 0:
        _refill_lanes(layer, row, physical_row, keys, values, k, region, num_layers)
    else:
        view = _dense_view(layer, row, physical_row, keys, values, comp.physical_len(target, prev), prev, num_layers)
        policy = row.plan.policy
        if decl.layout is KeptLayout.HEAD_LANES:
            prompt = comp.prompt_len
            total = layer_lanes(comp, keys.shape[1], policy.tokens_per_head(prompt, layer.layer, num_layers),
                                row.plan.max_tokens_per_head)
            plan = policy.plan_lanes(view, region, total, comp.block_size)
            lanes = LaneMap.build(plan.lengths, comp.block_size)
            if lanes.num_blocks > comp.kept_blocks:
                raise RuntimeError(f"{row.plan.config.policy}: lanes need {lanes.num_blocks} blocks, "
                                   f"the plan keeps {comp.kept_blocks}")
            layer.adapter.move_tokens(keys, values, *pack_addresses(physical_row, plan.indices, lanes, into))
            layer.state.lanes.put(row.req_id, layer.layer, lanes, num_layers, table.device)
            _log(layer, row, plan.indices, k)
        else:
            plan = policy.plan_rect(view, region=region, keep=comp.kept_tokens)
            kept = torch.stack(plan.indices)
            layer.adapter.move_tokens(keys, values, *rect_addresses(physical_row, kept, comp.block_size, into))
            _log(layer, row, plan.indices, k)
    layer.state.report.record_compaction(row.plan.config.policy, row.req_id, time.perf_counter() - start)


def _refill_lanes(layer: LayerEviction, row: RowInfo, physical_row: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, k: int, region: int, num_layers: int) -> None:
    """Decode-time point k >= 1 in the head-lane layout: every head keeps its lane count (the prompt's
    allocation) and refills its lanes with its best tokens among its lanes and the tail since C_(k-1),
    scored in one padded view (`lanes.lane_candidates`). The request's blocks stay as they are."""
    comp = row.plan.compaction
    starts, lengths = layer.state.lanes.get(row.req_id)[layer.layer].cpu()
    compacted = comp.kept_blocks * comp.block_size
    longest = int(lengths.max())
    tail_len = comp.physical_len(row.target, k - 1) - compacted
    grid, real = lane_candidates(physical_row, starts, lengths, comp.kept_blocks, tail_len, comp.block_size)
    queries, first = _window_queries(layer, row)
    scored_values = values[grid] if Need.VALUES in row.plan.declaration.needs else None
    view = LayerView(keys[grid], scored_values, queries, layer=layer.layer, num_layers=num_layers, key_mask=real,
                     query_start=None if first is None else longest + comp.physical_len(first, k - 1) - compacted)
    plan = row.plan.policy.replan_lanes(view, longest + region - compacted, lengths.tolist())
    lanes = LaneMap(tuple(starts.tolist()), tuple(lengths.tolist()), comp.block_size)
    layer.adapter.move_tokens(keys, values, *refill_addresses(physical_row, grid, plan.indices, lanes))
    _log(layer, row, plan.indices, k, kept_tokens=longest)


def _log(layer: LayerEviction, row: RowInfo, physical: list[torch.Tensor], k: int,
         kept_tokens: int | None = None) -> None:
    """Record what each head kept; positions below `kept_tokens` (default: the compacted region's) are the
    previous kept tokens in order, the rest the tail's."""
    if layer.state.kept is not None:
        comp = row.plan.compaction
        new_start = 0 if k == 0 else comp.tail_block(k - 1) * comp.block_size
        kept_tokens = comp.kept_tokens if kept_tokens is None else kept_tokens
        layer.state.kept.record(row.req_id, layer.layer, physical, kept_tokens, new_start, first=k == 0)


def _window_queries(layer: LayerEviction, row: RowInfo) -> tuple[torch.Tensor | None, int | None]:
    """The captured window queries [H_q, W, D] and the logical position of the first (None, None: none)."""
    chunks = layer.state.queries.pop(row.req_id, layer.layer)
    if not chunks:
        return None, None
    return torch.cat([c for _, c in chunks], dim=0).transpose(0, 1), chunks[0][0]


def _dense_view(layer: LayerEviction, row: RowInfo, physical_row: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, num_tokens: int, prev: int, num_layers: int) -> LayerView:
    comp = row.plan.compaction
    scored_values = values if Need.VALUES in row.plan.declaration.needs else None  # gathered only if scored
    dense_k, dense_v = layer.adapter.gather_dense(keys, scored_values, physical_row, num_tokens)
    queries, first = _window_queries(layer, row)
    query_start = None if first is None else comp.physical_len(first, prev)
    return LayerView(dense_k, dense_v, queries, query_start=query_start, layer=layer.layer, num_layers=num_layers)


def _retained(layer: LayerEviction, row: RowInfo, k: int, region: int) -> torch.Tensor:
    """Need.PRE_ROPE_QKV: choose among [kept region | tokens since compaction k-1] by their scores (the
    kept ones' as remembered, the new run's as the policy scores the run from its tokens' scores)."""
    comp = row.plan.compaction
    kept, pending = layer.state.scores.take(row.req_id, layer.layer)
    start = 0 if k == 0 else comp.tail_block(k - 1) * comp.block_size  # logical start of the new tokens
    run, expect = [], start
    for first, scores in pending:
        if first != expect:
            raise RuntimeError(f"{row.req_id} layer {layer.layer}: scores resume at {first}, expected {expect}")
        run.append(scores)
        expect += scores.shape[1]
    parts = ([] if k == 0 else [kept]) + ([row.plan.policy.run_scores(torch.cat(run, dim=1))] if run else [])
    scores = torch.cat(parts, dim=1) if parts and all(p is not None for p in parts) else None
    if scores is None or scores.shape[1] != region:
        got = None if scores is None else scores.shape[1]
        raise RuntimeError(f"{row.req_id} layer {layer.layer}: compaction {k} has scores for {got} of {region} tokens")
    indices = row.plan.policy.retain(scores, comp.kept_tokens)
    layer.state.scores.keep(row.req_id, layer.layer, scores.gather(1, indices))
    return indices
