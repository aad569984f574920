"""Post-process every VllmConfig: validate the KV policy, select our scheduler, worker and backend.

Wraps `EngineArgs.create_engine_config`, which both `vllm serve` and `LLM(...)` go through, so the
offline path (`LLM(..., additional_config={"kv_evict": {...}})`) is configured the same way.

    CPU    always: our scheduler and worker; the plugin put our backend in the CPU_ATTN slot (the torch
           path, or with VLLM_KVEVICT_BACKEND=triton the Triton path under the interpreter)
    CUDA   when a KV setting is given (any --kv-* flag or kv_evict config, `none` included): our scheduler,
           our GPU worker on vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0, set before the config is
           built), TRITON_ATTN (our subclass of it). Without one, vLLM runs as shipped.

Prefix caching stays as vLLM sets it. With it on, compaction copies the kept tokens into fresh blocks
and hands the prompt's own blocks back to the prefix cache (scheduler.py); with it off, compaction
works in place.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from vllm_kvevict import envs
from vllm_kvevict.core.requests import CONFIG_KEY, build_policy, server_config
from vllm_kvevict.integration.vllm.settings import check_servable

logger = logging.getLogger("vllm_kvevict")
_MARK = "_kvevict_wrapped"

SCHEDULER_CLS = "vllm_kvevict.integration.vllm.scheduler.KVEvictScheduler"
CPU_WORKER_CLS = "vllm_kvevict.integration.vllm.worker.KVEvictCPUWorker"
GPU_WORKER_CLS = "vllm_kvevict.integration.vllm.worker.KVEvictGPUWorker"
CPU_BACKEND_CLS = "vllm_kvevict.integration.vllm.backend.KVEvictCPUBackend"
TRITON_BACKEND_CLS = "vllm_kvevict.integration.vllm.triton_backend.KVEvictTritonBackend"


def kv_requested(additional_config: Mapping[str, Any] | None) -> bool:
    """Whether the engine was given a KV setting (our config key or any kv_* key)."""
    return any(k == CONFIG_KEY or str(k).startswith("kv_") for k in (additional_config or {}))


def configure(vllm_config) -> None:
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if not cpu and not kv_requested(vllm_config.additional_config):
        return  # CUDA without a KV setting: vLLM as shipped
    try:
        config = server_config(vllm_config.additional_config)
        check_servable(config, eager=bool(vllm_config.model_config.enforce_eager))
    except ValueError as exc:
        raise ValueError(f"vllm-kvevict: invalid KV eviction setting: {exc}") from None
    vllm_config.additional_config[CONFIG_KEY] = config.to_dict()
    if cpu:
        _check_cpu_backend()
        worker_cls, stock_workers = CPU_WORKER_CLS, ("auto", "vllm.v1.worker.cpu_worker.CPUWorker")
    else:
        _select_triton_attention(vllm_config)
        worker_cls, stock_workers = GPU_WORKER_CLS, ("auto", "vllm.v1.worker.gpu_worker.Worker")
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls is None or sched.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler":
        sched.scheduler_cls = SCHEDULER_CLS
    par = vllm_config.parallel_config
    if par.worker_cls in stock_workers:
        par.worker_cls = worker_cls
    if config.kind != "none":
        logger.info("vllm-kvevict: KV policy %s, budget %s", config.policy, config.budget)
        if build_policy(config).declaration.layers_differ:
            logger.warning(
                "vllm-kvevict: %s gives each layer its own budget, but all layers share a request's block row: "
                "a request holds the blocks of its largest layer (smaller layers use fewer of them)", config.policy)


def _check_cpu_backend() -> None:
    if envs.backend() == "triton":
        from vllm_kvevict.integration.vllm import triton_on_cpu

        if not triton_on_cpu.installed():
            raise ValueError("vllm-kvevict: VLLM_KVEVICT_BACKEND=triton needs the Triton-on-CPU shims installed "
                             "before vLLM is imported: start with `python -m "
                             "vllm_kvevict.integration.vllm.triton_on_cpu serve ...` (and TRITON_INTERPRET=1)")


def _select_triton_attention(vllm_config) -> None:
    """Eviction compacts the paged cache in TRITON_ATTN's layout, through our subclass of it."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    chosen = attention.backend
    if chosen is not None and chosen != AttentionBackendEnum.TRITON_ATTN:
        raise ValueError(
            f"vllm-kvevict: a KV policy runs on the TRITON_ATTN attention backend, but --attention-backend "
            f"{chosen.name} was given: drop that flag (or pass --attention-backend TRITON_ATTN)")
    attention.backend = AttentionBackendEnum.TRITON_ATTN


def _force_v1_model_runner() -> None:
    """Our worker hooks the V1 model runner (as the CPU worker's is): on CUDA, where V2 is the default,
    set VLLM_USE_V2_MODEL_RUNNER=0 before the config (which reads it) is built."""
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value not in (None, "0"):
        raise ValueError(f"vllm-kvevict: VLLM_USE_V2_MODEL_RUNNER={value!r}, but a KV policy needs vLLM's V1 "
                         "model runner: unset it (or set it to 0)")
    if value is None:
        logger.info("vllm-kvevict: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _MARK, False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() and kv_requested(self.additional_config):
            _force_v1_model_runner()
        vllm_config = original(self, *args, **kwargs)
        configure(vllm_config)
        return vllm_config

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config
