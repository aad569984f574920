"""The serving images: Dockerfile (CUDA) and Dockerfile.cpu, checked without building them.

hadolint (from the venv, installed with the `test` extra; missing fails, CI has it) must report
nothing under .hadolint.yaml, which ignores no rule. The rest ties the files to the project: the
base images pin the vLLM version pyproject pins, everything the package build needs is copied, the
extra pins match the lock, and the image is `vllm serve` on port 8000 as a non-root user.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILES = {"Dockerfile": "vllm/vllm-openai", "Dockerfile.cpu": "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / name).read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def args_of(name: str, word: str) -> list[str]:
    return [rest for w, rest in instructions(name) if w == word]


def pinned_vllm() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [cuda] = extras["cuda"]
    [cpu] = extras["cpu"]
    assert cuda.split("==")[1] == cpu.split("==")[1], (cuda, cpu)
    return cuda.split("==")[1]


def test_hadolint_reports_nothing():
    assert HADOLINT.exists(), f"{HADOLINT} is missing: pip install -e '.[test]' (make setup does)"
    out = subprocess.run(
        [str(HADOLINT), "--no-color", "-c", str(ROOT / ".hadolint.yaml"), *DOCKERFILES],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_config_ignores_no_rule():
    import yaml

    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    assert not config.get("ignored") and not (config.get("override") or {}).get("ignore")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_pins_the_vllm_version(name):
    [base] = args_of(name, "FROM")
    assert base == f"{DOCKERFILES[name]}:v{pinned_vllm()}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_vllm_serve_on_8000_as_non_root(name):
    assert [json.loads(e) for e in args_of(name, "ENTRYPOINT")] == [["vllm", "serve"]]
    assert not args_of(name, "CMD")  # the model and the policy come as arguments
    assert args_of(name, "EXPOSE") == ["8000"]
    user = args_of(name, "USER")[-1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    [health] = args_of(name, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in health


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copies_what_the_package_build_needs(name):
    sources = []
    for rest in args_of(name, "COPY"):
        words = shlex.split(rest)
        assert not any(w.startswith("--from") for w in words)
        sources += [w for w in words[:-1] if not w.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], "configs"}
    needed |= {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    assert needed <= set(sources)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_extra_pins_match_the_lock(name):
    lock = dict(
        line.split("==", 1) for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s]*)", " ".join(args_of(name, "RUN")))
    assert pins
    for package, version in pins:
        assert lock.get(package) == version, f"{name} pins {package}=={version}, the lock has {lock.get(package)}"
