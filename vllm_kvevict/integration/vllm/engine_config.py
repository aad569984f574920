"""Post-process every VllmConfig: validate the KV policy, select our scheduler, worker and backend.

Wraps `EngineArgs.create_engine_config`, which both `vllm serve` and `LLM(...)` go through, so the
offline path (`LLM(..., additional_config={"kv_evict": {...}})`) is configured the same way.

Prefix caching is turned off under a server-wide eviction policy: compaction rewrites a prompt's
leading blocks in place, and those blocks may be shared with other requests through the prefix
cache. (Compacting into fresh blocks would keep the prefix cache valid; not done yet.)
"""

from __future__ import annotations

import logging

from vllm_kvevict.core.requests import CONFIG_KEY, build_policy, server_config
from vllm_kvevict.integration.vllm.settings import check_servable
from vllm_kvevict.policies.declaration import LayerBudget

logger = logging.getLogger("vllm_kvevict")
_MARK = "_kvevict_wrapped"

SCHEDULER_CLS = "vllm_kvevict.integration.vllm.scheduler.KVEvictScheduler"
CPU_WORKER_CLS = "vllm_kvevict.integration.vllm.worker.KVEvictCPUWorker"
CPU_BACKEND_CLS = "vllm_kvevict.integration.vllm.backend.KVEvictCPUBackend"


def configure(vllm_config) -> None:
    from vllm.platforms import current_platform

    try:
        config = server_config(vllm_config.additional_config)
        check_servable(config, eager=bool(vllm_config.model_config.enforce_eager))
    except ValueError as exc:
        raise ValueError(f"vllm-kvevict: invalid KV eviction setting: {exc}") from None
    vllm_config.additional_config[CONFIG_KEY] = config.to_dict()
    if not current_platform.is_cpu():
        if config.kind != "none":
            raise ValueError(
                f"vllm-kvevict: kv_policy={config.policy!r} runs on the CPU backend in this release; "
                f"the {current_platform.device_name} backend is not wired yet"
            )
        return
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls is None or sched.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler":
        sched.scheduler_cls = SCHEDULER_CLS
    par = vllm_config.parallel_config
    if par.worker_cls in ("auto", "vllm.v1.worker.cpu_worker.CPUWorker"):
        par.worker_cls = CPU_WORKER_CLS
    if config.kind == "evict" and vllm_config.cache_config.enable_prefix_caching:
        logger.warning("vllm-kvevict: %s compacts prompts in place; disabling prefix caching", config.policy)
        vllm_config.cache_config.enable_prefix_caching = False
    if config.kind != "none":
        logger.info("vllm-kvevict: KV policy %s, budget %s", config.policy, config.budget)
        if build_policy(config).declaration.layer_budget is LayerBudget.PYRAMID:
            logger.warning(
                "vllm-kvevict: %s gives each layer its own budget, but all layers share a request's block row: "
                "a request holds the blocks of its largest layer (smaller layers use fewer of them)", config.policy)


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _MARK, False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        configure(vllm_config)
        return vllm_config

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config
