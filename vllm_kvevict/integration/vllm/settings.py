"""Which policy applies to a request, in every process, from vLLM's own config and request data.

The server-wide choice travels in `vllm_config.additional_config["kv_evict"]` (written by our CLI
flags or given directly with `--additional-config`); a request may override it with `kv_*` keys in
`SamplingParams.extra_args` (the OpenAI body's `vllm_xargs`). Scheduler and worker both call
`request_policy()` on the same data, so they agree without talking.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_kvevict.paged.layout import Compaction, plan_chunked_compaction, plan_compaction
from vllm_kvevict.policies.config import PolicyConfig

CONFIG_KEY = "kv_evict"


def server_config(additional_config: Mapping[str, Any] | None) -> PolicyConfig:
    """The server-wide PolicyConfig from `additional_config` (default: `none`)."""
    extra = dict(additional_config or {})
    nested = extra.get(CONFIG_KEY)
    if nested is not None:
        if isinstance(nested, PolicyConfig):
            return nested
        return PolicyConfig.from_dict(nested)
    flat = {k: v for k, v in extra.items() if k.startswith("kv_")}
    if not flat:
        return PolicyConfig()
    path = flat.pop("kv_config", None)
    base = PolicyConfig.from_yaml(path) if path else None
    return PolicyConfig.from_dict(flat, base=base) if base else PolicyConfig.from_dict(flat)


def request_overrides(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `kv_*` keys of a request's extra_args (the OpenAI body's vllm_xargs)."""
    return {k: v for k, v in (extra_args or {}).items() if isinstance(k, str) and k.startswith("kv_")}


def request_config(server: PolicyConfig, extra_args: Mapping[str, Any] | None) -> PolicyConfig:
    """The request's PolicyConfig; raises ValueError naming a bad override."""
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    return _request_config_cached(server, tuple(sorted((k, _hashable(v)) for k, v in overrides.items())))


@functools.lru_cache(maxsize=256)
def _request_config_cached(server: PolicyConfig, overrides: tuple) -> PolicyConfig:
    return PolicyConfig.from_dict(dict(overrides), base=server)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


#: Policy kinds this release runs inside vLLM.
SERVED_KINDS = ("none", "evict", "select")

#: Policies that read each layer's pre-RoPE q/k/v through a module hook, which needs eager execution.
NEEDS_EAGER = ("locret",)


def check_servable(config: PolicyConfig, *, eager: bool = True) -> None:
    """Raise ValueError if vLLM cannot run `config` (a kind not wired, a policy that cannot build, a
    policy that needs eager execution on a compiled model)."""
    if config.kind not in SERVED_KINDS or config.policy not in served_policies():
        raise ValueError(
            f"kv_policy={config.policy!r} ({config.kind}) is not served inside vLLM yet; "
            f"served policies: {', '.join(served_policies())}"
        )
    try:
        build_policy(config)  # e.g. locret without trained weights
    except ValueError as exc:
        raise ValueError(f"kv_policy={config.policy!r} cannot run: {exc}") from None
    if config.policy in NEEDS_EAGER and not eager:
        raise ValueError(
            f"kv_policy={config.policy!r} needs --enforce-eager: its retaining heads read every layer's "
            "pre-RoPE q/k/v through a hook on the qkv projection, which a compiled model does not run")


def served_policies() -> list[str]:
    from vllm_kvevict.policies.presets import POLICIES

    return [name for name, spec in POLICIES.items() if spec.kind in SERVED_KINDS]


def validate_request(server: PolicyConfig, extra_args: Mapping[str, Any] | None, *, prefix_caching: bool,
                     eager: bool = True) -> PolicyConfig:
    """The request's config, or ValueError naming the bad `vllm_xargs` field (the API answers 400).

    With prefix caching on (only possible when the server-wide policy is `none`), a request may not
    switch eviction on: compaction rewrites blocks in place that the prefix cache may share.
    """
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    try:
        config = request_config(server, extra_args)
        check_servable(config, eager=eager)
    except ValueError as exc:
        raise ValueError(f"vllm_xargs: {exc}") from None
    if prefix_caching and config.kind == "evict":
        raise ValueError(
            f"vllm_xargs: kv_policy={config.policy!r} needs prefix caching off; this server runs "
            "kv_policy='none' with prefix caching on (start it with --kv-policy, or --no-enable-prefix-caching)"
        )
    return config


def bad_field(message: str) -> str | None:
    """The `kv_*` field a validation message is about (for the HTTP 400's `param`)."""
    for key in ("kv_budget", "kv_config", "kv_policy"):  # a policy that "cannot run" may say why: its budget
        if key in message or key[3:] + "=" in message:
            return key
    return None


@functools.lru_cache(maxsize=256)
def build_policy(config: PolicyConfig) -> Any:
    """The policy object for a config (None for `none`), built once per distinct config."""
    return config.build()


@dataclass(frozen=True)
class RequestPlan:
    """What happens to one request's KV: its config, policy and (evict kinds) compaction."""

    config: PolicyConfig
    policy: Any
    compaction: Compaction | None


@functools.lru_cache(maxsize=4096)
def plan_for(config: PolicyConfig, prompt_len: int, block_size: int, num_layers: int) -> RequestPlan:
    """Deterministic per-request plan shared by scheduler and worker (asked every step: cached)."""
    policy = build_policy(config)
    if policy is None or config.kind != "evict":
        return RequestPlan(config, policy, None)
    per_head = policy.max_tokens_per_head(prompt_len, num_layers)
    if policy.eviction_chunk:  # Locret: compact after every prefill chunk
        return RequestPlan(config, policy, plan_chunked_compaction(prompt_len, per_head, block_size, policy.eviction_chunk))
    interval = dict(config.params).get("decode_interval", 0)  # policies that also evict while decoding
    return RequestPlan(config, policy, plan_compaction(prompt_len, per_head, block_size, interval))


def request_plan(
    server: PolicyConfig, extra_args: Mapping[str, Any] | None, prompt_len: int, block_size: int, num_layers: int
) -> RequestPlan:
    """The plan scheduler and worker both use. Admission rejected bad overrides already; if one gets
    through anyway (an engine driven without our admission check), the request keeps its full KV on
    both sides rather than crashing the engine or disagreeing."""
    try:
        config = request_config(server, extra_args)
        check_servable(config)
    except ValueError:
        config = PolicyConfig()
    return plan_for(config, prompt_len, block_size, num_layers)
