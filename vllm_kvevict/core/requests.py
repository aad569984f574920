"""Which policy applies to a request, and what it does to the request's blocks, in every process.

The server-wide choice travels in the engine's additional config under `CONFIG_KEY` (written by our
CLI flags or given directly with `--additional-config`); a request may override it with `kv_*` keys in
its sampling params' `extra_args` (the OpenAI body's `vllm_xargs`). Scheduler and worker both turn the
same data into the same `RequestPlan`, so they agree without talking. A `PlanBook` works a request's plan
out once and keeps it until the request ends (nothing is parsed per row per step).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from vllm_kvevict.paged.layout import Compaction, plan_chunked_compaction, plan_compaction
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.declaration import Declaration, Need, Trigger

CONFIG_KEY = "kv_evict"


def server_config(additional_config: Mapping[str, Any] | None) -> PolicyConfig:
    """The server-wide PolicyConfig from the engine's additional config (default: `none`)."""
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


@functools.lru_cache(maxsize=256)
def build_policy(config: PolicyConfig) -> Any:
    """The policy object for a config (None for `none`), built once per distinct config; raises
    ValueError when it cannot run (e.g. trained weights it needs are missing)."""
    return config.build()


@dataclass(frozen=True)
class RequestPlan:
    """What happens to one request's KV: its config, policy and (evicting policies) compaction."""

    config: PolicyConfig
    policy: Any
    compaction: Compaction | None
    #: tokens per KV head of the policy's largest layer (its blocks are the request's); 0 without compaction
    max_tokens_per_head: int = 0

    @property
    def declaration(self) -> Declaration | None:
        return None if self.policy is None else self.policy.declaration

    @property
    def selects(self) -> bool:
        return self.policy is not None and self.policy.declaration.selects

    @property
    def cacheable_prefix(self) -> int | None:
        """How many leading prompt tokens may come from the prefix cache (None: any). A policy scores what
        its steps compute: the window queries (the question) must be computed, and a policy scoring every
        token from its pre-RoPE q/k/v must compute them all. Any compacting request computes the token
        before its first compaction point: the step that reaches it compacts (a recomputed request, whose
        prompt is shorter than its tokens, could otherwise read the whole prompt from the cache and skip it).
        A selecting request reads what it would compute itself: the full cache's KV, up to its first
        selecting context."""
        if self.selects:
            return self.shareable_prefix  # what it would compute itself, the full cache's, and no further
        comp = self.compaction
        if comp is None or comp.is_noop:
            return None
        needs = self.declaration.needs
        if Need.PRE_ROPE_QKV in needs:
            return 0
        if Need.WINDOW_QUERIES in needs:
            return max(0, comp.start - max(1, self.policy.query_window(comp.prompt_len)))
        return comp.start - 1

    @property
    def shareable_prefix(self) -> int | None:
        """How many leading tokens of this request's own KV the prefix cache may offer others (None: all
        until a compaction stops its hashing): a selecting policy attends sparsely from its first selecting
        context on, so the KV it computes past that is not the full cache's."""
        return self.policy.first_selecting_context() if self.selects else None


@functools.lru_cache(maxsize=4096)
def plan_for(config: PolicyConfig, prompt_len: int, block_size: int, num_layers: int,
             copy_on_compact: bool = False) -> RequestPlan:
    """Deterministic per-request plan shared by scheduler and worker: the block rule of the policy's
    largest layer, compacted when its declaration says; into fresh blocks with `copy_on_compact`
    (prefix caching on: the prompt's blocks stay valid for other requests)."""
    policy = build_policy(config)
    if policy is not None:
        policy = policy.for_prompt(prompt_len)  # defaults that depend on the prompt's length, resolved
    if policy is None or policy.declaration.selects:
        return RequestPlan(config, policy, None)
    decl = policy.declaration
    per_head = policy.max_tokens_per_head(prompt_len, num_layers)
    if decl.trigger is Trigger.PER_PREFILL_CHUNK:
        comp = plan_chunked_compaction(prompt_len, per_head, block_size, decl.prefill_chunk)
    else:
        comp = plan_compaction(prompt_len, per_head, block_size, decl.decode_interval)
    if copy_on_compact and not comp.is_noop:
        comp = dataclasses.replace(comp, copy_on_compact=True)
    return RequestPlan(config, policy, comp, per_head)


def request_plan(server: PolicyConfig, extra_args: Mapping[str, Any] | None, prompt_len: int, block_size: int,
                 num_layers: int, copy_on_compact: bool = False) -> RequestPlan:
    """The plan scheduler and worker both use. Admission rejected bad overrides already; if one gets
    through anyway (an engine driven without our admission check), the request keeps its full KV on
    both sides rather than crashing the engine or disagreeing."""
    try:
        config = request_config(server, extra_args)
        build_policy(config)
    except ValueError:
        config = PolicyConfig()
    return plan_for(config, prompt_len, block_size, num_layers, copy_on_compact)


class PlanBook:
    """Request id -> its RequestPlan, worked out on first sight and kept until `forget`."""

    def __init__(self, server: PolicyConfig, block_size: int, num_layers: int, copy_on_compact: bool = False):
        self.server = server
        self.block_size = block_size
        self.num_layers = num_layers
        self.copy_on_compact = copy_on_compact  # prefix caching is on: compact into fresh blocks
        self._plans: dict[str, RequestPlan] = {}

    def get(self, req_id: str, extra_args: Mapping[str, Any] | None, prompt_len: int) -> RequestPlan:
        plan = self._plans.get(req_id)
        if plan is None or plan.compaction is not None and plan.compaction.prompt_len != prompt_len:
            plan = request_plan(self.server, extra_args, prompt_len, self.block_size, self.num_layers,
                                self.copy_on_compact)
            self._plans[req_id] = plan
        return plan

    def forget(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._plans.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._plans)
