"""Attention backends with the eviction core: vLLM's backend / metadata builder / impl, plus two seams.

Builder: when the step involves eviction or selection, `core.eviction.plan_step` rewrites the batch's
seq_lens and block rows to the physical layout (vLLM's kernel then reads [compacted region | tail]) and
the resulting `StepPlan` rides on the metadata as `.kvevict`. Positions and slot_mapping stay logical.
Impl: around vLLM's own kernel, the layer's `LayerEviction` captures, scores, replaces the output of
rows it attends to itself, and compacts. Each backend names its cache-layout adapter.

The CPU_ATTN one is here (torch twins, and vLLM's CPU kernel for lane attention: `cpu_lanes.py`);
`triton_backend.py` has TRITON_ATTN's.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder

from vllm_kvevict.core.adapter import TORCH_CPU, CacheAdapter
from vllm_kvevict.core.eviction import LayerEviction, plan_step
from vllm_kvevict.core.state import worker_state
from vllm_kvevict.integration.vllm.cpu_lanes import cpu_adapter
from vllm_kvevict.paged.cache_layout import check_cpu_isa


class EvictionBuilderMixin:
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        state = worker_state()
        step = state.step
        cm = common_attn_metadata
        if step is None or not step.active or len(step.rows) != cm.num_reqs:
            return super().build(common_prefix_len, cm, fast_build)
        plan, seq_lens, block_table = plan_step(step, cm.query_start_loc_cpu.tolist(), cm.seq_lens,
                                                cm.block_table_tensor, state, self._physical_buffers(cm))
        if seq_lens is not cm.seq_lens:
            cm = dataclasses.replace(cm, seq_lens=seq_lens, block_table_tensor=block_table,
                                     max_seq_len=int(seq_lens.max()))
        metadata = super().build(common_prefix_len, cm, fast_build)
        metadata.kvevict = plan
        return metadata

    def _physical_buffers(self, cm) -> tuple:
        """Persistent (seq_lens, block_table) the physical rewrite is written into (rows sliced per step;
        as wide as the runner's block table, so a row slice stays contiguous)."""
        buffers = getattr(self, "_kvevict_buffers", None)
        rows, cols = cm.block_table_tensor.shape
        if buffers is None or buffers[1].shape[0] < rows or buffers[1].shape[1] != cols:
            rows = max(rows, self.vllm_config.scheduler_config.max_num_seqs)
            buffers = (torch.empty(rows, dtype=cm.seq_lens.dtype, device=cm.seq_lens.device),
                       torch.empty(rows, cols, dtype=cm.block_table_tensor.dtype, device=cm.block_table_tensor.device))
            self._kvevict_buffers = buffers
        return buffers


class EvictionImplMixin:
    #: how this backend's KV memory is read and written (set by each backend)
    cache_adapter: CacheAdapter

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        plan = getattr(attn_metadata, "kvevict", None) if attn_metadata is not None else None
        if plan is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        eviction = self.eviction(layer)
        eviction.before_attention(plan, query)
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        eviction.after_attention(plan, query, kv_cache, output)
        return out

    def eviction(self, layer) -> LayerEviction:
        """This layer's LayerEviction (made on first use)."""
        eviction = getattr(self, "_kvevict_layer", None)
        if eviction is None:
            self.check_layer(layer)
            eviction = LayerEviction(extract_layer_index(layer.layer_name), self.cache_adapter, self.scale,
                                     worker_state())
            self._kvevict_layer = eviction
        return eviction

    def check_layer(self, layer) -> None:
        """Refuse a layer whose cache layout the adapter does not implement."""


class KVEvictCPUMetadataBuilder(EvictionBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class KVEvictCPUImpl(EvictionImplMixin, CPUAttentionBackendImpl):
    cache_adapter = TORCH_CPU

    def check_layer(self, layer) -> None:
        check_cpu_isa(layer.isa)
        self.cache_adapter = cpu_adapter(layer.isa)  # lanes through vLLM's CPU kernel (cpu_lanes.py)


class KVEvictCPUBackend(CPUAttentionBackend):
    """CPU_ATTN with the eviction core (registered over CPU_ATTN by the plugin)."""

    @staticmethod
    def get_builder_cls():
        return KVEvictCPUMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return KVEvictCPUImpl
