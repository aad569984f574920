"""`vllm-kvevict policies`: the policies, with a line each, or as JSON for machines."""

from __future__ import annotations

import argparse
import json

from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.registry import POLICIES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policies", help="list the KV policies and their defaults")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {name, kind, description, defaults, params, declaration}")
    parser.set_defaults(func=run)


def describe_all() -> list[dict]:
    out = []
    for spec in POLICIES.values():
        out.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "description": spec.description,
                "defaults": spec.defaults(),
                "params": [
                    {"name": p.name, "type": p.kind.__name__, "default": p.default, "allowed": p.allowed(), "help": p.help}
                    for p in spec.params
                ],
                "declaration": _declaration(spec.name),
            }
        )
    return out


def _declaration(name: str) -> dict | None:
    """What the policy declares with its default parameters (None: the full cache, or it cannot build here)."""
    try:
        policy = PolicyConfig(name).build()
    except ValueError:
        return None
    if policy is None:
        return None
    decl = policy.declaration
    return {"trigger": decl.trigger.value, "needs": sorted(n.value for n in decl.needs), "layout": decl.layout.value,
            "layer_budget": decl.layer_budget.value, "prefill_chunk": decl.prefill_chunk,
            "decode_interval": decl.decode_interval}


def run(args: argparse.Namespace) -> int:
    rows = describe_all()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        budget = r["defaults"].get("budget")
        extra = f" (default budget {budget})" if budget is not None else ""
        print(f"{r['name']:<{width}}  {r['kind']:<6}  {r['description']}{extra}")
    return 0
