"""Shared by the GPU benchmark scripts: load our kernels from a checkout, print and save results.

The GPU machines have torch and Triton but not vLLM, and may not have this package installed: then
`kernels/` is registered as `vllm_kvevict.kernels` straight from the checkout.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_kernel(name: str):
    """`vllm_kvevict.kernels.<name>`, installed or from this checkout."""
    sys.path.insert(0, ROOT)
    try:
        return importlib.import_module(f"vllm_kvevict.kernels.{name}")
    except ImportError:
        kernels = os.path.join(ROOT, "kernels")
        spec = importlib.util.spec_from_file_location("vllm_kvevict.kernels", os.path.join(kernels, "__init__.py"),
                                                      submodule_search_locations=[kernels])
        package = importlib.util.module_from_spec(spec)
        sys.modules["vllm_kvevict.kernels"] = package
        spec.loader.exec_module(package)
        return importlib.import_module(f"vllm_kvevict.kernels.{name}")


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
