"""`PolicyConfig`: a validated, frozen choice of policy, budget and parameters.

Every entry point builds one of these: YAML presets (`configs/`), CLI flags, `--additional-config`
and per-request `vllm_xargs`. Keys may carry a `kv_` prefix and dashes (`kv_policy`, `kv-budget`,
`sink-tokens`). Unknown keys, and keys that do not apply to the chosen policy, are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vllm_kvevict.policies.budget import parse_budget
from vllm_kvevict.policies.registry import POLICIES, get_spec


def normalize_key(key: str) -> str:
    key = str(key).strip().replace("-", "_")
    return key[3:] if key.startswith("kv_") else key


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "none"
    budget: int | float | None = None
    params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        spec = get_spec(self.policy)
        given = dict(self.params)
        checked: dict[str, Any] = {}
        for key, value in given.items():
            param = spec.param(key)
            if param is None:
                raise ValueError(_not_applicable(key, self.policy))
            checked[key] = param.check(value, where=f"{self.policy}: ")
        for param in spec.params:
            checked.setdefault(param.name, param.default)
        budget = self.budget
        if spec.kind == "none":
            budget = None  # the full cache has no budget; a server-wide one is simply not used
        elif budget is None:
            budget = spec.default_budget
        else:
            budget = parse_budget(budget, where=f"{self.policy}: ")
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "params", tuple(sorted(checked.items())))

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: PolicyConfig | None = None) -> PolicyConfig:
        """Build from a flat mapping; with `base`, the mapping overrides it (per-request overrides).

        Switching policy keeps the base's budget (when the new policy has one) and those of the base's
        parameters the operator set (not left at the base policy's default) that the new policy takes;
        the rest are the new policy's own defaults (a `vatp` request on a `snapkv` server keeps vatp's
        20 sinks and decode interval). Explicitly given parameters must apply.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a policy configuration must be a mapping, got {type(data).__name__}")
        flat = {normalize_key(k): v for k, v in data.items()}
        policy = flat.pop("policy", None)
        if policy is not None and not isinstance(policy, str):
            raise ValueError(f"kv_policy={policy!r} is invalid: expected one of {', '.join(POLICIES)}")
        budget = flat.pop("budget", None)
        if base is None:
            return cls(policy or "none", budget, tuple(flat.items()))
        policy = policy or base.policy
        spec = get_spec(policy)
        base_spec = get_spec(base.policy)
        inherited = {k: v for k, v in base.params if spec.param(k) is not None
                     and (policy == base.policy or v != base_spec.param(k).default)}
        inherited.update(flat)
        if budget is None and spec.kind != "none":
            budget = base.budget if get_spec(base.policy).kind == spec.kind else None
        return cls(policy, budget, tuple(inherited.items()))

    @classmethod
    def from_yaml(cls, path: str | Path) -> PolicyConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"kv_config={str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"kv_config={str(path)!r} is not valid YAML: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    # ---- use -------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return get_spec(self.policy).kind

    def get(self, name: str) -> Any:
        return dict(self.params)[name]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy}
        if self.budget is not None:
            out["budget"] = self.budget
        out.update(dict(self.params))
        return out

    def build(self) -> Any:
        """The policy object (None for `none`); raises if it cannot run (e.g. locret without weights)."""
        spec = get_spec(self.policy)
        return None if spec.factory is None else spec.factory(self.budget, dict(self.params))


def _not_applicable(key: str, policy: str) -> str:
    users = [name for name, spec in POLICIES.items() if spec.param(key) is not None]
    spec = get_spec(policy)
    allowed = ["budget"] * (spec.kind != "none") + [p.name for p in spec.params]
    if users:
        return (f"{key!r} does not apply to policy {policy!r} (it applies to: {', '.join(users)}); "
                f"{policy!r} takes: {', '.join(allowed) or 'no parameters'}")
    return f"unknown key {key!r} for policy {policy!r}: it takes {', '.join(allowed) or 'no parameters'}"
