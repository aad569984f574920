"""The `vllm-kvevict` console script. Each sub-command lives in its own module with `register()`."""

from __future__ import annotations

import argparse
import sys

from vllm_kvevict.cli import config_cmd, eval_cmd, loadtest_cmd, locret_cmd, model_cmd, policies_cmd

_COMMANDS = (policies_cmd, model_cmd, eval_cmd, loadtest_cmd, config_cmd, locret_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-kvevict",
        description="KV-cache eviction and selection policies for vLLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as exc:  # user-facing errors: one clear line, no traceback
        print(f"vllm-kvevict {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
