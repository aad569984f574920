"""GPU benchmark: compacting one layer of one request (the staged token move), rectangular and head-lanes.

Needs a CUDA GPU, torch and Triton; not vLLM. For each context length, a request's prompt in a paged flash
layout cache (permuted block row) keeps 1/N of its tokens per KV head (ascending random positions) and
moves them into its leading blocks, as compaction does:

    rect-1/N    every head the same count (`move_triton.compact`)
    lanes-1/N   ragged per-head counts packed into head-lanes (`move_triton.pack_lanes`)

and reports the time and the achieved bandwidth (each kept K and V row is read twice and written twice:
source -> staging -> destination) as a fraction of a device-to-device copy measured in the same run.

    python scripts/bench_compaction.py [--contexts 8192,32768,131072] [--budgets 8] [--out DIR]

Defaults: a Llama-3-8B layer (8 KV heads, head size 128, bf16), block size 16.
"""

from __future__ import annotations

import math

import torch
from bench_lane_attention import copy_bandwidth, ragged_lengths
from gpu_bench import load_kernel, paged_args, parse_on_gpu, report


def main() -> None:
    ap = paged_args(__doc__, "8192,32768,131072", "bench_compaction")
    ap.add_argument("--budgets", default="8", help="keep 1/N of the context per head, for each N")
    args = parse_on_gpu(ap, "bench_compaction")
    from triton.testing import do_bench

    move = load_kernel("move_triton")
    from vllm_kvevict.paged.lanes import LaneMap

    dev, dtype, heads, dim, bs = "cuda", torch.bfloat16, args.kv_heads, args.head_dim, args.block_size
    gen = torch.Generator().manual_seed(0)
    copy_bw = copy_bandwidth(dev)
    records = []
    for context in args.contexts:
        blocks = math.ceil(context / bs)
        cache = torch.randn(2, blocks + 8, bs, heads, dim, dtype=dtype, device=dev)
        keys, values = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
        row = torch.randperm(blocks + 8, device=dev)[:blocks]
        for n in [int(b) for b in args.budgets.split(",")]:
            keep = context // n
            rect = torch.stack([torch.sort(torch.randperm(context, generator=gen)[:keep]).values for _ in range(heads)])
            rect = rect.to(dev)
            lengths = ragged_lengths(keep * heads, heads, context, gen)
            lanes = LaneMap.build(lengths, bs)
            ragged = [torch.sort(torch.randperm(context, generator=gen)[:m]).values.to(dev) for m in lengths]
            moved = keep * heads * dim * 2 * cache.element_size()  # K and V rows of every kept token
            for name, run in ((f"rect-1/{n}", lambda: move.compact(keys, values, row, rect)),
                              (f"lanes-1/{n}", lambda: move.pack_lanes(keys, values, row, ragged, lanes))):
                ms = do_bench(run)
                bw = 4 * moved / (ms * 1e-3)
                records.append(dict(context=context, variant=name, kept_tokens_per_head=keep, time_ms=ms,
                                    bytes_moved=moved, bandwidth_gb_s=bw / 1e9, fraction_of_copy_bw=bw / copy_bw))
        del cache
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), copy_bandwidth_gb_s=copy_bw / 1e9, kv_heads=heads,
                  head_dim=dim, block_size=bs, dtype="bfloat16", records=records)
    rows = [[str(r["context"]), r["variant"], f"{r['time_ms']:.4f}", f"{r['bandwidth_gb_s']:.0f}",
             f"{r['fraction_of_copy_bw']:.0%}"] for r in records]
    report(f"device {result['device']}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)",
           ["context", "variant", "time (ms)", "GB/s", "of copy bandwidth"], rows, args.out, "bench_compaction", result)


if __name__ == "__main__":
    main()
