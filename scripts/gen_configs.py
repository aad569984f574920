"""Write configs/<policy>.yaml, one commented preset per policy, from the policy registry.

Run after changing a policy's parameters: `.venv/bin/python scripts/gen_configs.py`. A unit test
checks the committed files still match the registry's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_kvevict.policies.registry import POLICIES

OUT = Path(__file__).resolve().parent.parent / "configs"


def render(name: str) -> str:
    spec = POLICIES[name]
    lines = [
        f"# {name}: {spec.description}",
        f"# Use: vllm serve MODEL --kv-config configs/{name}.yaml   (flags given after it override it)",
        f"policy: {name}",
    ]
    if spec.default_budget is not None:
        what = "k, tokens selected per query" if spec.kind == "select" else "tokens kept per KV head (int), or a ratio of the prompt (0 < r <= 1)"
        lines += [f"# budget: {what}", f"budget: {spec.default_budget}"]
    for p in spec.params:
        lines.append(f"# {p.help}; {p.allowed()}")
        lines.append(f"{p.name}: {json.dumps(p.default)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name in POLICIES:
        (OUT / f"{name}.yaml").write_text(render(name))
    print(f"wrote {len(POLICIES)} presets to {OUT}")


if __name__ == "__main__":
    main()
