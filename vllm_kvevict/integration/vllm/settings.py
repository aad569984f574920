"""What vLLM can serve, decided at start-up (flags, engine config) and at admission (per-request overrides).

The policy choice itself lives in `vllm_kvevict.core.requests` (vLLM-free). Here: the checks that
depend on how vLLM runs the model, read from each policy's declaration, and the admission rule that
turns a bad `vllm_xargs` field into an HTTP 400.
"""

from __future__ import annotations

from typing import Any, Mapping

from vllm_kvevict.core.requests import build_policy, request_config, request_overrides
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.declaration import Need


def check_servable(config: PolicyConfig, *, eager: bool = True) -> None:
    """Raise ValueError if vLLM cannot run `config`: a policy that cannot build (e.g. trained weights it
    needs are missing), or one that reads pre-RoPE q/k/v (a module hook) on a compiled model."""
    try:
        policy = build_policy(config)
    except ValueError as exc:
        raise ValueError(f"kv_policy={config.policy!r} cannot run: {exc}") from None
    if policy is not None and Need.PRE_ROPE_QKV in policy.declaration.needs and not eager:
        raise ValueError(
            f"kv_policy={config.policy!r} needs --enforce-eager: it reads every layer's pre-RoPE q/k/v "
            "through a hook on the qkv projection, which a compiled model does not run")


def validate_request(server: PolicyConfig, extra_args: Mapping[str, Any] | None, *, eager: bool = True,
                     enabled: bool = True) -> PolicyConfig:
    """The request's config, or ValueError naming the bad `vllm_xargs` field (the API answers 400).

    A server started without any KV setting on CUDA (`enabled` False) runs vLLM as shipped and takes none.
    Prefix caching restricts nothing: with it on, compaction copies into fresh blocks.
    """
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    if not enabled:
        raise ValueError(f"vllm_xargs: {', '.join(sorted(overrides))} need a server started with a KV setting "
                         "(e.g. --kv-policy none, which allows per-request policies)")
    try:
        config = request_config(server, extra_args)
        check_servable(config, eager=eager)
    except ValueError as exc:
        raise ValueError(f"vllm_xargs: {exc}") from None
    return config


def bad_field(message: str) -> str | None:
    """The `kv_*` field a validation message is about (for the HTTP 400's `param`)."""
    for key in ("kv_budget", "kv_config", "kv_policy"):  # a policy that "cannot run" may say why: its budget
        if key in message or key[3:] + "=" in message:
            return key
    return None
