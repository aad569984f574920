"""TRITON_ATTN with the eviction core: the CUDA path (and, under the interpreter, the same code on a CPU).

vLLM's own Triton backend (flash layout, `unified_attention`) plus the seams of `backend.py`: the
builder's physical metadata rewrite and the impl's `LayerEviction`, whose cache adapter runs our Triton
kernels (`paged/*_triton.py`) on the flash layout's neutral views. Registered for TRITON_ATTN on CUDA,
and in the CPU_ATTN slot when VLLM_KVEVICT_BACKEND=triton (`triton_on_cpu.py`).

CUDA graphs: while eviction is on, attention must run eagerly (the core decides per step, in Python),
so the builder reports NEVER; vLLM then downgrades its default FULL_AND_PIECEWISE to PIECEWISE: the
model's other ops still run in captured graphs, attention between them. Without a KV policy configured
the builder reports what vLLM's does (ALWAYS), and behaves exactly like it.
"""

from __future__ import annotations

import functools

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from vllm_kvevict.core.adapter import CacheAdapter, triton_flash
from vllm_kvevict.core.requests import CONFIG_KEY
from vllm_kvevict.integration.vllm.backend import EvictionBuilderMixin, EvictionImplMixin


class KVEvictTritonMetadataBuilder(EvictionBuilderMixin, TritonAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if CONFIG_KEY in (vllm_config.additional_config or {}):
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)


class KVEvictTritonImpl(EvictionImplMixin, TritonAttentionImpl):
    @property
    def cache_adapter(self) -> CacheAdapter:
        return _adapter()

    def check_layer(self, layer) -> None:
        if self._is_per_token_head_quant or self.kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"vllm-kvevict compacts the KV cache in the model's dtype; --kv-cache-dtype {self.kv_cache_dtype} "
                "is not supported with a KV policy (use the default 'auto')")


@functools.cache
def _adapter() -> CacheAdapter:
    return triton_flash()


class KVEvictTritonBackend(TritonAttentionBackend):
    """TRITON_ATTN with the eviction core (registered over TRITON_ATTN by the plugin)."""

    @staticmethod
    def get_builder_cls():
        return KVEvictTritonMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return KVEvictTritonImpl
