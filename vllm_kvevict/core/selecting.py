"""Attention of selecting rows (Trigger.PER_QUERY): each query piece attends to its selection plus the
piece's own tokens, causally, instead of the whole cache (vllm_kvevict/paged/selection.py has the maths).

    decode rows   one query each: all rows of one policy object go through one batched pass per layer,
                  through the adapter's *_batch ops (a cache lookup for all of them, scoring and voting
                  for the misses, one sparse attention launch), whatever the batch size
    prefill rows  the step's tokens cut into pieces at multiples of the policy's `prefill_chunk`; each
                  piece selects with its mean query over the context cached before it

A selection cache per (request, layer) reuses the last picks while the new query's cosine similarity to
the cached one is at least the policy's threshold (`policies/soft_vote.py`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from vllm_kvevict.core.step import RowInfo
from vllm_kvevict.policies.soft_vote import query_fingerprint

if TYPE_CHECKING:
    from vllm_kvevict.core.eviction import LayerEviction, StepPlan


def selected_attention(layer: LayerEviction, plan: StepPlan, query: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor, out: torch.Tensor) -> None:
    decode: dict[int, list[int]] = defaultdict(list)  # policy object -> its single-query rows
    for i, row in enumerate(plan.step.rows):
        if not row.selects:
            continue
        if row.num_scheduled == 1:
            decode[id(row.plan.policy)].append(i)
        else:
            _pieces(layer, plan, i, query, keys, values, out)
    for rows in decode.values():
        _decode_batch(layer, plan, rows, query, keys, values, out)


def _decode_batch(layer: LayerEviction, plan: StepPlan, rows: list[int], query: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, out: torch.Tensor) -> None:
    infos = [plan.step.rows[i] for i in rows]
    policy = infos[0].plan.policy
    device = query.device
    tokens = torch.tensor([plan.query_start[i] for i in rows], device=device)
    q = query[tokens]  # [R, H_q, D]
    tables = plan.logical_tables[rows]
    ctx = [row.num_computed for row in infos]  # positions cached before each row's query
    fingerprints = q.float().reshape(len(rows), -1)
    keys_ = [(row.req_id, layer.layer) for row in infos]
    picks = layer.state.selections.lookup_batch(keys_, fingerprints, policy.threshold)
    missed = [r for r, p in enumerate(picks) if p is None]
    if missed:
        top_k = [policy.top_k(ctx[r]) for r in missed]
        num_cand = torch.tensor([ctx[r] - policy.n_init - policy.n_local for r in missed], device=device)
        scores = layer.adapter.paged_scores_batch(q[missed], keys, tables[missed], policy.n_init, num_cand,
                                                  max(ctx[r] for r in missed) - policy.n_init - policy.n_local)
        fresh = layer.adapter.vote_topk_batch(scores, torch.tensor(top_k, device=device), policy.pool_kernel)
        for m, r in enumerate(missed):
            picks[r] = fresh[m, : top_k[m]] + policy.n_init
            layer.state.selections.store(keys_[r], fingerprints[r], picks[r])
    selected, counts = _with_windows(picks, ctx, policy.n_init, policy.n_local, device)
    out[tokens] = layer.adapter.sparse_attention_batch(q, keys, values, tables, selected, counts,
                                                       torch.tensor(ctx, device=device), layer.scale).to(out.dtype)
    for r, row in enumerate(infos):
        layer.state.report.record_selection(row.plan.config.policy, row.req_id, r not in missed, counts[r])


def _with_windows(picks: list[torch.Tensor], ctx: list[int], n_init: int, n_local: int, device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's [0, n_init) U picks U [ctx - n_local, ctx) (picks that the grown local window now covers
    dropped), packed to the front of a padded [R, W] int64 tensor (-1 after), and the counts [R]."""
    padded = torch.nn.utils.rnn.pad_sequence(picks, batch_first=True, padding_value=-1)  # [R, kmax]
    ctx_t = torch.tensor(ctx, device=device)[:, None]
    padded = torch.where(padded < ctx_t - n_local, padded, -1)
    init = torch.arange(n_init, device=device).expand(len(picks), -1)
    local = ctx_t - n_local + torch.arange(n_local, device=device)
    merged = torch.cat([init, padded, local], dim=1)
    big = torch.iinfo(merged.dtype).max
    merged = torch.sort(torch.where(merged >= 0, merged, big), dim=1).values
    counts = (merged != big).sum(dim=1)
    return torch.where(merged == big, -1, merged), counts


def _pieces(layer: LayerEviction, plan: StepPlan, i: int, query: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor, out: torch.Tensor) -> None:
    row = plan.step.rows[i]
    policy = row.plan.policy
    table = plan.logical_tables[i]
    base = plan.query_start[i] - row.num_computed  # position p's token is batch row base + p
    for first, last in policy.pieces(row.num_computed, row.end):
        if not policy.selects(first):
            continue
        q = query[base + first : base + last]
        selected = _select_piece(layer, row, q, keys, table, first)
        out[base + first : base + last] = layer.adapter.sparse_attention(
            q, keys, values, table, selected, first, layer.scale).to(out.dtype)


def _select_piece(layer: LayerEviction, row: RowInfo, q: torch.Tensor, keys: torch.Tensor, table: torch.Tensor,
                  ctx: int) -> torch.Tensor:
    policy = row.plan.policy
    cache = layer.state.selections
    fingerprint = query_fingerprint(q.transpose(0, 1))
    picked = cache.lookup((row.req_id, layer.layer), fingerprint, policy.threshold)
    hit = picked is not None
    if not hit:
        positions = torch.arange(policy.n_init, ctx - policy.n_local, device=q.device)
        scores = layer.adapter.paged_scores(q.float().mean(dim=0), keys, table, positions)
        picked = positions[layer.adapter.vote_topk(scores, policy.top_k(ctx), policy.pool_kernel)]
        cache.store((row.req_id, layer.layer), fingerprint, picked)
    selected = policy.with_windows(picked[picked < ctx], ctx)
    layer.state.report.record_selection(row.plan.config.policy, row.req_id, hit, selected.numel())
    return selected
