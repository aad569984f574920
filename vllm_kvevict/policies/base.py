"""`Policy`: what every KV policy is, evicting or selecting; the registry is built from its subclasses.

A policy class carries, as class data, everything listings, configs and the eviction core need:

    name, description   how users select it (`--kv-policy NAME`) and what `vllm-kvevict policies` says
    param_specs         its tunable fields (typed, range-checked `Param`s) with their defaults
    default_budget      its budget when none is given (a token count or a ratio of the prompt)
    trigger             when it acts (`declaration.Trigger`); the rest of its `Declaration` may
                        depend on parameter values, so it is read from an instance

A class without a `name` of its own is an abstract base and is not registered.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from vllm_kvevict.policies.declaration import Declaration, Trigger
from vllm_kvevict.policies.params import Param


class Policy:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    param_specs: ClassVar[tuple[Param, ...]] = ()
    default_budget: ClassVar[int | float] = 1024
    trigger: ClassVar[Trigger] = Trigger.AFTER_PREFILL

    def __init__(self, budget: int | float, params: dict[str, Any]):
        self.budget = budget
        self.params = {p.name: p.default for p in self.param_specs}
        self.params.update(params)

    @classmethod
    def kind(cls) -> str:
        """'select' (attends to a subset, frees nothing) or 'evict'."""
        return "select" if cls.trigger is Trigger.PER_QUERY else "evict"

    @functools.cached_property
    def declaration(self) -> Declaration:
        """When it acts, what it needs, how kept tokens are laid out (read by the eviction core)."""
        return self.declare()

    def for_prompt(self, num_tokens: int) -> Policy:
        """The policy a request with a `num_tokens`-token prompt runs: parameters whose default depends on
        the prompt (e.g. on the budget's share of it) resolved. Default: this policy itself."""
        return self

    def declare(self) -> Declaration:
        """This instance's declaration (subclasses add what their parameters decide)."""
        return Declaration(self.trigger)

    def describe(self) -> str:
        return f"{self.name}(budget={self.budget}, {', '.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"
