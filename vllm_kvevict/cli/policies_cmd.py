"""`vllm-kvevict policies`: the policies, with a line each, or as JSON for machines."""

from __future__ import annotations

import argparse
import json

from vllm_kvevict.policies.registry import POLICIES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policies", help="list the KV policies and their defaults")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {name, kind, description, defaults, params}")
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
            }
        )
    return out


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
