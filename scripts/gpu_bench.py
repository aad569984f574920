"""Shared by the GPU benchmark scripts: load our kernels from this checkout, print and save results.

The GPU machines have torch and Triton but not vLLM, and may not have this package installed: the
checkout's root goes first on sys.path, and `vllm_kvevict.paged` imports neither vLLM nor anything
outside torch and Triton.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_kernel(name: str):
    """`vllm_kvevict.paged.<name>` (a `*_triton` module) from this checkout."""
    sys.path.insert(0, ROOT)
    return importlib.import_module(f"vllm_kvevict.paged.{name}")


def report(title: str, header: list[str], rows: list[list[str]], out: str | None, name: str, doc: dict) -> None:
    """Print a Markdown table under `title`; write `doc` to OUT/NAME.json if `out` is given."""
    print(title)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=2)
