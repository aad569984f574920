"""The package's rooms and their import rules, read from the source (no import needed).

    policies/      pure torch + stdlib: imports nothing of ours outside itself
    paged/         paged maths, twins, kernels: imports policies/ and itself
    core/          the backend-neutral eviction core: imports policies/, paged/ and itself
    integration/   the vLLM shell: may import all of the above; never names a policy

No room imports vLLM except integration/ (and the tools around it: eval/, bench/, cli/, models/), and
no module-level import cycle exists anywhere in the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_kvevict"
ALLOWED = {"policies": {"policies"}, "paged": {"policies", "paged"}, "core": {"policies", "paged", "core"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_inward_only_and_never_vllm(room):
    for name, path in _modules().items():
        if not name.startswith(f"vllm_kvevict.{room}"):
            continue
        for imported in _imports(path, top_level_only=False):
            if imported == "vllm" or imported.startswith("vllm."):
                pytest.fail(f"{name} imports {imported}")
            if imported.startswith("vllm_kvevict."):
                target = imported.split(".")[1]
                assert target in ALLOWED[room], f"{name} imports {imported}: {room}/ may import {sorted(ALLOWED[room])}"


def test_no_module_level_import_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_integration_and_core_never_name_a_policy():
    from vllm_kvevict.policies.registry import names

    named = [n for n in names() if n != "none"]  # "none" means "off" there
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, named)) + r")(?![\w-])", re.IGNORECASE)
    for room in ("integration", "core"):
        for path in (PACKAGE / room).rglob("*.py"):
            hits = pattern.findall(path.read_text())
            assert not hits, f"{path.relative_to(PACKAGE)} names {sorted(set(hits))}"


def test_no_getattr_probing_of_policies_in_the_core_or_integration():
    for room in ("integration", "core"):
        for path in (PACKAGE / room).rglob("*.py"):
            assert not re.search(r"getattr\((row\.)?(plan\.)?policy\b", path.read_text()), path
