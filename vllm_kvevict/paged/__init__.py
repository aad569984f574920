"""Paged maths below the eviction core: vLLM-free, policy-free, torch + Triton only.

    layout.py          block arithmetic of a compacted request (scheduler and worker agree by it)
    cache_layout.py    a backend's KV cache -> neutral [num_blocks, H_kv, bs, D] key / value views
    compact.py         dense reads and staged token moves over neutral views (rectangular compaction)
    lanes.py           head-lane addressing of ragged per-head regions (Ada-KV), packing, lane attention
    selection.py       TokenSelect over the paged cache: paged scores, soft vote, sparse attention

Every `*_triton.py` holds the Triton kernels of the module named before `_triton`, which is their torch
twin: same arguments, same result (tests/paged compares them on odd sizes and permuted block rows).
The twins are what the CPU path runs; the kernels are what the CUDA path runs. Nothing here imports vLLM.
"""
