"""The console script and the package layout."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from vllm_kvevict.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
# the five papers' policies: the registry finds at least these (a new policy adds itself)
PAPERS = {"streamingllm", "snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv", "vatp", "nacl", "locret", "tokenselect"}
KIND_ORDER = {"none": 0, "evict": 1, "select": 2}


def test_policies_json_lists_every_registered_policy(capsys):
    from vllm_kvevict.policies.registry import POLICIES

    assert main(["policies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names == list(POLICIES) and PAPERS <= set(names) and names[0] == "none"
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["tokenselect"] == "select" and all(kinds[n] == "evict" for n in PAPERS - {"tokenselect"})
    # listed by kind (the full cache, evicting, selecting), then by name
    assert names == sorted(names, key=lambda n: (KIND_ORDER[kinds[n]], n if n != "none" else ""))
    ada = next(r for r in rows if r["name"] == "ada-snapkv")
    assert ada["defaults"]["budget"] == 1024 and ada["defaults"]["floor_alpha"] == 0.2
    assert ada["declaration"] == {"trigger": "after_prefill", "needs": ["window_queries"], "layout": "head_lanes",
                                  "layer_budget": "uniform", "prefill_chunk": 0, "decode_interval": 0}
    declared = {r["name"]: r["declaration"] for r in rows}
    assert declared["none"] is None and declared["locret"]["prefill_chunk"] == 512
    assert declared["vatp"]["decode_interval"] == 128 and declared["tokenselect"]["trigger"] == "per_query"


def test_policies_table(capsys):
    from vllm_kvevict.policies.registry import POLICIES

    assert main(["policies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(POLICIES) and lines[2].startswith("ada-snapkv")


def test_console_script_is_installed():
    from vllm_kvevict.policies.registry import POLICIES

    exe = Path(sys.executable).parent / "vllm-kvevict"
    out = subprocess.run([str(exe), "policies", "--json"], capture_output=True, text=True, check=True)
    assert len(json.loads(out.stdout)) == len(POLICIES)


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vllm_kvevict").rglob("__init__.py")
    }
    assert found == listed


def test_policies_paged_maths_and_core_do_not_import_vllm():
    code = "import sys, vllm_kvevict.policies as p; [s.factory for s in p.POLICIES.values()]; " \
           "import vllm_kvevict.paged.layout, vllm_kvevict.paged.lanes, vllm_kvevict.paged.selection; " \
           "import vllm_kvevict.core.eviction, vllm_kvevict.core.adapter; " \
           "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
