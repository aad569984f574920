"""Test-run settings that must exist before anything imports Triton.

Triton decides at import time whether its own helpers (tl.max, tl.sum, ...) are compiled or
interpreted, so kernel tests on a machine without a CUDA GPU need TRITON_INTERPRET=1 from the start of
the process (DESIGN.md section 2). vLLM's CPU path never runs a Triton kernel, so the e2e tests are
unaffected (the full suite runs with it)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
