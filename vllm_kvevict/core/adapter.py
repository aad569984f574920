"""Cache-layout adapters: the few operations of the eviction core that touch a backend's KV memory.

The core never indexes a KV cache itself. It asks its adapter for neutral key / value views
([num_blocks, H_kv, bs, D], `paged.cache_layout`) and hands them to the adapter's operations:

    gather_dense      a row's first T positions as dense K, V [H_kv, T, D] (scoring a prompt)
    move_tokens       staged moves of kept tokens inside a row's blocks (compaction, lane packing)
    lane_attention    attention over ragged head-lanes + the standard tail, whole batch at once: the
                      lane rows' queries, the step's `LaneBatch` and the layer (a per-layer twin or
                      kernel sits behind `one_layer`; an adapter may memoise step-wide work in
                      `LaneBatch.scratch`, built by the first layer, read by the others)
    paged_scores      q . k over a candidate range (selection), then vote_topk: head soft vote + top-k
    sparse_attention  attention over a selected position list + the step's own tokens
    *_batch           the same three for a whole decode batch at once (one launch each)

`TORCH_CPU` runs the torch twins on CPU_ATTN's layout (the CPU path); `TRITON_FLASH` runs the Triton
kernels on TRITON_ATTN's flash layout (the CUDA path, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from vllm_kvevict.paged import cache_layout, compact, lanes, selection
from vllm_kvevict.policies import soft_vote


@dataclass(frozen=True)
class CacheAdapter:
    name: str
    views: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    gather_dense: Callable
    move_tokens: Callable
    lane_attention: Callable
    paged_scores: Callable
    vote_topk: Callable
    sparse_attention: Callable
    paged_scores_batch: Callable
    vote_topk_batch: Callable
    sparse_attention_batch: Callable


def one_layer(lane_attention: Callable) -> Callable:
    """A lane-attention twin or kernel taking one layer's maps (`lanes.lane_attention`'s arguments), as
    the adapter's `lane_attention(query, keys, values, lanes: LaneBatch, layer, scale)`."""
    def run(query, keys, values, batch, layer: int, scale: float) -> torch.Tensor:
        maps = batch.lane_maps[:, layer]
        return lane_attention(query, keys, values, batch.tables, maps[:, 0], maps[:, 1], batch.num_compacted,
                              batch.query_req, batch.query_pos, scale, longest=batch.longest)
    return run


TORCH_CPU = CacheAdapter(
    "torch twins on CPU_ATTN", cache_layout.cpu_views, compact.gather_dense, compact.move_tokens,
    one_layer(lanes.lane_attention), selection.paged_scores, soft_vote.vote_topk, selection.sparse_attention,
    selection.paged_scores_batch, selection.vote_topk_batch, selection.sparse_attention_batch,
)


def _kernels(name: str) -> ModuleType:
    return importlib.import_module(f"vllm_kvevict.paged.{name}")  # imports Triton: only when asked for


def triton_flash() -> CacheAdapter:
    """The Triton kernels on TRITON_ATTN's flash layout."""
    move, lane, select = _kernels("move_triton"), _kernels("lane_attention_triton"), _kernels("selection_triton")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132

    @one_layer
    def lane_attention(*args, longest: int | None = None):  # split long decodes over the SMs
        return lane.lane_attention(*args, num_splits=None, longest=longest, num_sms=num_sms)

    return CacheAdapter(
        "Triton kernels on TRITON_ATTN", cache_layout.flash_views, compact.gather_dense, move.move_tokens,
        lane_attention, select.paged_scores, select.vote_topk, select.sparse_attention,
        select.paged_scores_batch, select.vote_topk_batch, select.sparse_attention_batch,
    )
