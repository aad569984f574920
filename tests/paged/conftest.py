"""Kernel tests: native on a CUDA GPU, Triton's interpreter on CPU tensors otherwise (tests/conftest.py
sets TRITON_INTERPRET=1 for the whole run on CPU machines)."""

import importlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_module(name: str):
    """vllm_kvevict.paged.<name>, checked to be interpreted on CPU (a compiled kernel cannot read CPU tensors)."""
    module = importlib.import_module(f"vllm_kvevict.paged.{name}")
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        kernels = [v for v in vars(module).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
        assert kernels and all(isinstance(k, InterpretedFunction) for k in kernels), "TRITON_INTERPRET was not set in time"
    return module
