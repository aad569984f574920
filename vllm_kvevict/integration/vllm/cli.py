"""`vllm serve --kv-policy ... --kv-budget ...`: our flags on vLLM's own parser.

vLLM has no hook for new flags, but `EngineArgs.add_cli_args` and `from_cli_args` are looked up at
call time, after general plugins have loaded (DESIGN.md section 3). We wrap both: the first adds an
argument group, the second validates our flags and folds them into `additional_config["kv_evict"]`,
which every process sees. An invalid value stops start-up with a message naming it.
"""

from __future__ import annotations

import argparse
from typing import Any

from vllm_kvevict.core.requests import CONFIG_KEY, server_config
from vllm_kvevict.integration.vllm.settings import check_servable
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.registry import POLICIES

_MARK = "_kvevict_wrapped"
# every parameter of every policy becomes --kv-<name>; parsed as strings, validated by PolicyConfig
_PARAM_NAMES = sorted({p.name for spec in POLICIES.values() for p in spec.params})


def add_kv_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    if any(getattr(a, "dest", None) == "kv_policy" for a in parser._actions):
        return parser  # idempotent: plugins load more than once per process
    group = parser.add_argument_group(
        "KV eviction (vllm-kvevict)",
        "Evict or select KV-cache entries per request. Flags override --kv-config; "
        "`vllm-kvevict policies` lists the policies and their parameters.",
    )
    group.add_argument("--kv-policy", default=None, choices=list(POLICIES), help="the KV policy (default: none)")
    group.add_argument("--kv-budget", default=None, help="tokens kept per KV head (e.g. 1024), or a ratio of the prompt (e.g. 0.125)")
    group.add_argument("--kv-config", default=None, help="a YAML preset (see configs/); flags given here override it")
    for name in _PARAM_NAMES:
        group.add_argument(f"--kv-{name.replace('_', '-')}", dest=f"kv_{name}", default=None, help=argparse.SUPPRESS)
    return parser


def kv_args_to_config(args: argparse.Namespace) -> PolicyConfig | None:
    """The PolicyConfig our flags describe, or None when none was given."""
    given: dict[str, Any] = {}
    for key in ("kv_policy", "kv_budget", *(f"kv_{n}" for n in _PARAM_NAMES)):
        value = getattr(args, key, None)
        if value is not None:
            given[key] = value
    path = getattr(args, "kv_config", None)
    if not given and path is None:
        return None
    base = PolicyConfig.from_yaml(path) if path else None
    return PolicyConfig.from_dict(given, base=base) if base else PolicyConfig.from_dict(given)


def fold_into_additional_config(args: argparse.Namespace) -> None:
    """Validate our flags and store the result where every vLLM process will see it."""
    config = kv_args_to_config(args)
    extra = getattr(args, "additional_config", None) or {}
    if isinstance(extra, str):  # older argparse paths hand over the raw JSON
        import json

        extra = json.loads(extra)
    if config is None:
        if any(k == CONFIG_KEY or k.startswith("kv_") for k in extra):
            config = server_config(extra)  # validate --additional-config '{"kv_policy": ...}' at start-up
        else:
            return
    check_servable(config, eager=bool(getattr(args, "enforce_eager", False)))
    extra = {k: v for k, v in extra.items() if not (k == CONFIG_KEY or k.startswith("kv_"))}
    extra[CONFIG_KEY] = config.to_dict()
    args.additional_config = extra


def install() -> None:
    """Wrap EngineArgs.add_cli_args / from_cli_args once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _MARK, False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *a, **kw):
        return add_kv_args(original_add(parser, *a, **kw))

    def from_cli_args(cls, args):
        try:
            fold_into_additional_config(args)
        except ValueError as exc:
            raise SystemExit(f"vllm-kvevict: invalid KV eviction setting: {exc}") from None
        return original_from(cls, args)

    setattr(add_cli_args, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
