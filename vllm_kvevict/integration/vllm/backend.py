"""Attention backend (CPU_ATTN override): physical lengths for compacted requests, and compaction.

Builder: for every row whose prompt was compacted in an earlier step, shrink its seq_len by the freed
tokens and drop the freed logical blocks from its block-table row (layout.py has the diagram), so
vLLM's own kernel reads [compacted region | tail]. Positions and slot_mapping stay logical.

Impl: while a prompt is being prefilled, keep the queries its policy scores with (the last W prompt
positions, possibly spread over several chunks). In the step that writes the prompt's last token,
after this layer's attention ran over the full prompt, score the prompt, select n*bs tokens per KV
head and move them into the leading blocks (paged.compact). Layer by layer, in place.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_kvevict.integration.vllm.worker import (
    RowInfo,
    StepContext,
    current_step,
    lane_store,
    qkv_captures,
    query_store,
    score_store,
    selection_store,
)
from vllm_kvevict.paged.cache_layout import check_cpu_isa, cpu_views
from vllm_kvevict.paged.compact import compact, gather_dense
from vllm_kvevict.paged.lanes import LaneMap, lane_attention, pack_lanes
from vllm_kvevict.paged.layout import layer_lanes
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.tokenselect import query_fingerprint
from vllm_kvevict.paged.selection import paged_scores, sparse_attention, vote_topk, with_fixed_windows

logger = logging.getLogger("vllm_kvevict")


@dataclasses.dataclass
class StepEviction:
    """Attached to the attention metadata of a step that involves eviction."""

    step: StepContext
    query_start: list[int]
    logical_rows: dict[int, torch.Tensor]  # row index -> logical block row (finishing prompts)
    step_tables: torch.Tensor | None = None  # the logical block table (head-lane or selecting rows)


class KVEvictCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        step = current_step()
        if step is None or not step.active or len(step.rows) != common_attn_metadata.num_reqs:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        block_table = cm.block_table_tensor
        logical_rows = {i: block_table[i].clone() for i, row in enumerate(step.rows) if row.reaches_point}
        if any(row.compacted for row in step.rows):
            cm = _physical_metadata(cm, step)
        metadata = super().build(common_prefix_len, cm, fast_build)
        lanes = any(row.compacted and lane_store().get(row.req_id, 0) is not None for row in step.rows)
        tables = block_table.clone() if lanes or any(row.selects for row in step.rows) else None
        metadata.kvevict = StepEviction(step, cm.query_start_loc_cpu.tolist(), logical_rows, tables)
        return metadata


def _physical_metadata(cm, step: StepContext):
    seq_lens = cm.seq_lens.clone()
    block_table = cm.block_table_tensor.clone()
    for i, row in enumerate(step.rows):
        if not row.compacted:
            continue
        comp = row.plan.compaction
        physical = comp.physical_len(int(seq_lens[i]), row.epoch)
        used = -(-physical // comp.block_size)
        block_table[i, :used] = _physical_table(comp, block_table[i], row.epoch)[:used]
        seq_lens[i] = physical
    return dataclasses.replace(
        cm, seq_lens=seq_lens, block_table_tensor=block_table, max_seq_len=int(seq_lens.max())
    )


def _physical_table(comp, table: torch.Tensor, epoch: int) -> torch.Tensor:
    """`Compaction.physical_row` of a block-table row tensor (epoch -1: the logical row itself)."""
    return torch.tensor(comp.physical_row(table.tolist(), epoch), dtype=table.dtype)


class KVEvictCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kv_layer: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        info = getattr(attn_metadata, "kvevict", None) if attn_metadata is not None else None
        if info is not None:
            if self._kv_layer is None:
                self._kv_layer = extract_layer_index(layer.layer_name)
                check_cpu_isa(layer.isa)
            self._capture_queries(info, query)
            self._score_tokens(info)
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if info is not None:
            self._ragged_attention(info, query, kv_cache, output)
            self._selected_attention(info, query, kv_cache, output)
            for i, row_table in info.logical_rows.items():
                row = info.step.rows[i]
                start = time.perf_counter()
                self._compact_row(row, row_table, kv_cache, info.step.num_layers)
                selection_store().record_compaction(row.plan.config.policy, row.req_id, time.perf_counter() - start)
        return out

    def _ragged_attention(self, info: StepEviction, query: torch.Tensor, kv_cache: torch.Tensor,
                          output: torch.Tensor) -> None:
        """Rows compacted in the head-lane layout: vLLM's kernel read their blocks as if every head owned
        its lane; replace those rows' output with attention over each head's own lanes + the tail."""
        if info.step_tables is None:
            return
        keys, values = cpu_views(kv_cache)
        for i, row in enumerate(info.step.rows):
            if not row.compacted:
                continue
            lanes = lane_store().get(row.req_id, self._kv_layer)
            if lanes is None:
                continue
            comp = row.plan.compaction
            first, last = info.query_start[i], info.query_start[i + 1]
            tail_len = row.num_computed + row.num_scheduled - comp.compactable_tokens
            physical_row = _physical_table(comp, info.step_tables[i], row.epoch)
            q = query[first:last]
            out = output[first:last].view(last - first, q.shape[1], q.shape[2])
            out.copy_(lane_attention(q, keys, values, physical_row, lanes, comp.kept_blocks, tail_len, self.scale))

    def _selected_attention(self, info: StepEviction, query: torch.Tensor, kv_cache: torch.Tensor,
                            output: torch.Tensor) -> None:
        """TokenSelect rows: replace vLLM's full attention with attention over the selected positions.

        The step's tokens are cut into pieces at multiples of the policy's `prefill_chunk` (a decode step
        is one piece); each piece selects with its mean query over the context cached before it, and
        its queries read the selection plus the piece's own tokens, causally (vllm_kvevict/selection.py).
        """
        if info.step_tables is None:
            return
        keys, values = cpu_views(kv_cache)
        for i, row in enumerate(info.step.rows):
            if not row.selects:
                continue
            policy = row.plan.policy
            table = info.step_tables[i]
            base = info.query_start[i] - row.num_computed  # position p's token is batch row base + p
            out = output.view(-1, query.shape[1], query.shape[2])
            for first, last in policy.pieces(row.num_computed, row.num_computed + row.num_scheduled):
                if not policy.selects(first):
                    continue
                q = query[base + first : base + last]
                selected = self._select(row, policy, q, keys, table, first)
                out[base + first : base + last] = sparse_attention(q, keys, values, table, selected, first, self.scale)

    def _select(self, row: RowInfo, policy, q: torch.Tensor, keys: torch.Tensor, table: torch.Tensor,
                ctx: int) -> torch.Tensor:
        store = selection_store()
        fingerprint = query_fingerprint(q.transpose(0, 1))
        picked = store.cache.lookup((row.req_id, self._kv_layer), fingerprint, policy.threshold)
        hit = picked is not None
        if not hit:
            positions = torch.arange(policy.n_init, ctx - policy.n_local)
            scores = paged_scores(q.float().mean(dim=0), keys, table, positions)
            picked = positions[vote_topk(scores, policy.top_k, policy.pool_kernel)]
            store.cache.store((row.req_id, self._kv_layer), fingerprint, picked)
        selected = with_fixed_windows(picked[picked < ctx], ctx, policy.n_init, policy.n_local)
        store.record(policy.name, row.req_id, hit, int(selected.numel()))
        return selected

    def _score_tokens(self, info: StepEviction) -> None:
        """Per-chunk eviction (Locret): score this step's tokens that a later compaction chooses among,
        from their pre-RoPE q/k/v (captured by the worker's hook on this layer's qkv projection)."""
        if not info.step.needs_qkv:
            return
        qkv = qkv_captures().pop(self._kv_layer, None)
        if qkv is None:
            raise RuntimeError(
                f"layer {self._kv_layer}: no pre-RoPE q/k/v was captured for a {info.step.rows[0].plan.config.policy} "
                "request; it needs a decoder whose layers have a fused self_attn.qkv_proj and --enforce-eager")
        for i, row in enumerate(info.step.rows):
            if not row.scores_qkv:
                continue
            first = row.num_computed
            last = min(row.num_computed + row.num_scheduled, row.plan.compaction.last_point)
            if first >= last:
                continue
            base = info.query_start[i] - row.num_computed
            score_store().add(row.req_id, self._kv_layer, first,
                              row.plan.policy.chunk_scores(self._kv_layer, qkv[base + first : base + last]))

    def _capture_queries(self, info: StepEviction, query: torch.Tensor) -> None:
        for i, row in enumerate(info.step.rows):
            target = row.target
            if target is None:
                continue
            if row.num_computed == 0:
                query_store().restart(row.req_id, self._kv_layer)  # a fresh (or recomputed) prefill
                lane_store().restart(row.req_id, self._kv_layer)
                score_store().restart(row.req_id, self._kv_layer)
            first, last = _window(row, target)
            if first >= last:
                continue
            base = info.query_start[i] - row.num_computed
            rows = query[base + first : base + last].detach().clone()
            query_store().add(row.req_id, self._kv_layer, first, rows)

    def _compact_row(self, row: RowInfo, table: torch.Tensor, kv_cache: torch.Tensor, num_layers: int) -> None:
        """Compaction k at point P_k = row.target, over the layout of epoch k-1 (-1: the logical prompt)."""
        comp = row.plan.compaction
        target = row.target
        k = comp.epoch(target)
        prev = k - 1
        physical_row = _physical_table(comp, table, prev)
        region = comp.physical_len(comp.tail_block(k) * comp.block_size, prev)
        policy = row.plan.policy
        if policy.needs_qkv:  # Locret: by the scores remembered with the kept tokens and the chunk's
            self._retain_row(row, k, region, physical_row, kv_cache)
            return
        keys, values = gather_dense(*cpu_views(kv_cache), physical_row, comp.physical_len(target, prev))
        chunks = query_store().pop(row.req_id, self._kv_layer)
        queries = query_start = None
        if chunks:
            query_start = comp.physical_len(chunks[0][0], prev)
            queries = torch.cat([c for _, c in chunks], dim=0).transpose(0, 1)  # [H_q, W, D]
        view = LayerView(keys, values, queries, query_start=query_start, layer=self._kv_layer, num_layers=num_layers)
        if k == 0 and getattr(policy, "allocator", None) == "ada":  # ragged heads: the head-lane layout
            prompt = comp.prompt_len
            lanes_total = layer_lanes(comp, keys.shape[0], policy.tokens_per_head(prompt, self._kv_layer, num_layers),
                                      policy.max_tokens_per_head(prompt, num_layers))
            plan = policy.plan_lanes(view, region, lanes_total, comp.block_size)
            lanes = LaneMap.build(plan.lengths, comp.block_size)
            if lanes.num_blocks > comp.kept_blocks:
                raise RuntimeError(f"{policy.name}: lanes need {lanes.num_blocks} blocks, the plan keeps {comp.kept_blocks}")
            pack_lanes(*cpu_views(kv_cache), physical_row, plan.indices, lanes)
            lane_store().put(row.req_id, self._kv_layer, lanes)
            return
        plan = policy.plan_rect(view, region=region, keep=comp.kept_tokens)
        compact(*cpu_views(kv_cache), physical_row, torch.stack(plan.indices))


    def _retain_row(self, row: RowInfo, k: int, region: int, physical_row: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """Compaction k of a per-chunk policy: choose among [kept region | tokens since compaction k-1]."""
        comp = row.plan.compaction
        kept, pending = score_store().take(row.req_id, self._kv_layer)
        start = 0 if k == 0 else comp.tail_block(k - 1) * comp.block_size  # logical start of the new tokens
        parts = [] if k == 0 else [kept]
        expect = start
        for first, scores in pending:
            if first != expect:
                raise RuntimeError(f"{row.req_id} layer {self._kv_layer}: scores resume at {first}, expected {expect}")
            parts.append(scores)
            expect += scores.shape[1]
        scores = torch.cat(parts, dim=1) if parts and all(p is not None for p in parts) else None
        if scores is None or scores.shape[1] != region:
            got = None if scores is None else scores.shape[1]
            raise RuntimeError(f"{row.req_id} layer {self._kv_layer}: compaction {k} has scores for {got} of {region} tokens")
        indices = row.plan.policy.retain(scores, comp.kept_tokens)
        compact(*cpu_views(kv_cache), physical_row, indices)
        score_store().keep(row.req_id, self._kv_layer, scores.gather(1, indices))


def _window(row: RowInfo, target: int) -> tuple[int, int]:
    """Logical positions [first, last) of this step's queries the policy scores at `target`."""
    comp = row.plan.compaction
    policy = row.plan.policy
    if target == comp.prompt_len:
        window = policy.query_window(row.prompt_len)
    else:  # decode-time: at most the queries since the previous point
        window = min(policy.query_window(target), target - comp.point(comp.epoch(target) - 1))
    first = max(row.num_computed, target - window)
    last = min(row.num_computed + row.num_scheduled, target)
    return first, last


class KVEvictCPUBackend(CPUAttentionBackend):
    """CPU_ATTN with per-request eviction (registered over CPU_ATTN by the plugin)."""

    @staticmethod
    def get_builder_cls():
        return KVEvictCPUMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return KVEvictCPUImpl
