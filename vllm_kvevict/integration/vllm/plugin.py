"""The `vllm.general_plugins` entry point: runs in every vLLM process, possibly more than once.

It adds our CLI flags, checks per-request overrides at admission, exports our metrics, overrides the
CPU attention backend with ours, and makes every engine config use our scheduler and worker. With
policy `none` (the default) and no per-request override, these behave exactly like vLLM's own.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_kvevict")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_kvevict.integration.vllm import admission, cli, engine_config, metrics

    cli.install()
    engine_config.install()
    admission.install()
    metrics.install()
    # The CPU platform always resolves CPU_ATTN; an override registered for it is honoured.
    register_backend(AttentionBackendEnum.CPU_ATTN, engine_config.CPU_BACKEND_CLS)
