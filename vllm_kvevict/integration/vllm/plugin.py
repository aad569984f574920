"""The `vllm.general_plugins` entry point: runs in every vLLM process, possibly more than once.

It adds our CLI flags, checks per-request overrides at admission, exports our metrics, registers our
attention backend (CPU_ATTN's slot on CPU; TRITON_ATTN's on CUDA), and makes engine configs use our
scheduler and worker (engine_config.py). With policy `none` (the default) and no per-request override,
these behave exactly like vLLM's own.
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

    from vllm.platforms import current_platform

    from vllm_kvevict import envs

    cli.install()
    engine_config.install()
    admission.install()
    metrics.install()
    if current_platform.is_cpu():
        # The CPU platform always resolves CPU_ATTN; an override registered for it is honoured.
        triton = envs.backend() == "triton"
        register_backend(AttentionBackendEnum.CPU_ATTN,
                         engine_config.TRITON_BACKEND_CLS if triton else engine_config.CPU_BACKEND_CLS)
    else:
        # Selected only where engine_config asks for TRITON_ATTN (a KV setting was given); without one
        # the subclass behaves exactly like vLLM's.
        register_backend(AttentionBackendEnum.TRITON_ATTN, engine_config.TRITON_BACKEND_CLS)
