"""The named policies, found in this package: every `Policy` subclass with a `name` of its own.

A new policy is one module here defining its class (with its parameters and declaration); nothing else
lists it. `POLICIES` maps name -> `PolicySpec`, `none` (the full cache) first, then the evicting
policies, then the selecting ones, each group by name. Modules are imported on first use, so importing
this module is cheap and free of cycles.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from vllm_kvevict.policies.params import Param

_KIND_ORDER = {"none": 0, "evict": 1, "select": 2}


@dataclass(frozen=True)
class PolicySpec:
    name: str
    kind: str  # "none", "evict" or "select"
    description: str
    params: tuple[Param, ...]
    default_budget: int | float | None
    factory: Callable[[Any, dict[str, Any]], Any] | None  # the policy class (None: the full cache)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.default_budget is None else {"budget": self.default_budget}
        out.update({p.name: p.default for p in self.params})
        return out


FULL_CACHE = PolicySpec("none", "none", "full cache, nothing evicted (the baseline)", (), None, None)


def _discover() -> dict[str, PolicySpec]:
    import vllm_kvevict.policies as package
    from vllm_kvevict.policies.base import Policy

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    found: dict[str, PolicySpec] = {}
    pending = list(Policy.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = cls.__dict__.get("name")
        if not name or not cls.__module__.startswith(package.__name__ + "."):
            continue  # an abstract base, or a class defined elsewhere (a test's)
        if name in found or name == FULL_CACHE.name:
            raise RuntimeError(f"two policies are named {name!r}")
        found[name] = PolicySpec(name, cls.kind(), cls.description, cls.param_specs, cls.default_budget, cls)
    ordered = sorted(found.values(), key=lambda s: (_KIND_ORDER[s.kind], s.name))
    return {s.name: s for s in [FULL_CACHE, *ordered]}


class _Registry(Mapping[str, PolicySpec]):
    """A read-only mapping filled on first use."""

    def __init__(self) -> None:
        self._specs: dict[str, PolicySpec] | None = None

    def _all(self) -> dict[str, PolicySpec]:
        if self._specs is None:
            self._specs = _discover()
        return self._specs

    def __getitem__(self, name: str) -> PolicySpec:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


POLICIES: Mapping[str, PolicySpec] = _Registry()


def get_spec(name: str) -> PolicySpec:
    spec = POLICIES.get(name)
    if spec is None:
        raise ValueError(f"kv_policy={name!r} is unknown: expected one of {', '.join(POLICIES)}")
    return spec


def names(kind: str | None = None) -> list[str]:
    """Registered policy names (of one kind: 'evict' or 'select'), in listing order."""
    return [n for n, s in POLICIES.items() if kind is None or s.kind == kind]
