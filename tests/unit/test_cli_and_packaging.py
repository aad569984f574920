"""The console script and the package layout."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from vllm_kvevict.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
ALL = ["none", "streamingllm", "snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv", "vatp", "nacl", "locret", "tokenselect"]


def test_policies_json_lists_all_ten(capsys):
    assert main(["policies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ALL
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["none"] == "none" and kinds["tokenselect"] == "select"
    assert all(kinds[n] == "evict" for n in ALL if n not in ("none", "tokenselect"))
    ada = next(r for r in rows if r["name"] == "ada-snapkv")
    assert ada["defaults"]["budget"] == 1024 and ada["defaults"]["floor_alpha"] == 0.2


def test_policies_table(capsys):
    assert main(["policies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[4].startswith("ada-snapkv")


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "vllm-kvevict"
    out = subprocess.run([str(exe), "policies", "--json"], capture_output=True, text=True, check=True)
    assert len(json.loads(out.stdout)) == 10


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vllm_kvevict").rglob("__init__.py")
    }
    assert found == listed


def test_policy_library_does_not_import_vllm():
    code = "import sys, vllm_kvevict.policies as p; [s.factory for s in p.POLICIES.values()]; " \
           "from vllm_kvevict.policies import snapkv, nacl, vatp, locret, tokenselect, streamingllm; " \
           "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
