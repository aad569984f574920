"""Triton kernels, installed as `vllm_kvevict.kernels`. Each kernel has a torch twin next to it,
which is also what the CPU path runs (DESIGN.md section 2, "Triton on CPU")."""
