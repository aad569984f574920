"""Shared by the GPU benchmark scripts: load our kernels from this checkout, print and save results.

The GPU machines have torch and Triton but not vLLM, and may not have this package installed: the
checkout's root goes first on sys.path, and `vllm_kvevict.paged` imports neither vLLM nor anything
outside torch and Triton.
"""

from __future__ import annotations

import argparse
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


def paged_args(doc: str, contexts: str, out_name: str) -> argparse.ArgumentParser:
    """A benchmark's parser with the paged-cache shape every kernel benchmark takes (add its own, then
    `parse_on_gpu`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--contexts", default=contexts, help="context lengths in tokens, comma list")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", default=None, help=f"folder for {out_name}.json")
    return ap


def parse_on_gpu(ap: argparse.ArgumentParser, name: str) -> argparse.Namespace:
    """Parsed arguments, or exit with a clear message where no CUDA GPU is visible."""
    import torch

    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"{name} needs a CUDA GPU (the kernels' CPU correctness tests are in tests/paged)")
    args.contexts = [int(c) for c in args.contexts.split(",")]
    return args
