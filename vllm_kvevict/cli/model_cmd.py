"""`vllm-kvevict model`: prepare the default model and print its path (nothing else on stdout)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("model", help="prepare the default model (SmolLM2-135M-Instruct) and print its path")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: $VLLM_KVEVICT_CACHE_DIR or ~/.cache/vllm-kvevict)")
    parser.add_argument("--force", action="store_true", help="rebuild even if it is already prepared")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_kvevict.models.smollm2 import prepare_default_model

    print(prepare_default_model(args.cache_dir, force=args.force))
    return 0
