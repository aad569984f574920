"""GPU benchmark: decode attention over ragged head-lanes (Ada-KV compacted) vs dense attention.

Needs a CUDA GPU, torch and Triton; not vLLM. One run times, side by side, for every context length:

    sdpa-full    torch SDPA (flash) over the full contiguous K/V: the dense reference
    lanes-full   our kernel with every token kept (the paged layout, no eviction)
    lanes-1/N    our kernel after ragged compaction to 1/N of the context per layer (Ada-KV budgets:
                 random per-head lengths summing to the budget), plus a one-block tail

and reports the times, the ratios to sdpa-full, and the achieved bandwidth (bytes of K and V the kernel
must read, over its time) as a fraction of a device-to-device copy measured in the same run.

    python scripts/bench_lane_attention.py [--contexts 8192,32768,131072] [--budgets 8,32] [--out DIR]

Shapes default to a Llama-3-8B layer (32 query heads, 8 KV heads, head size 128, bf16), batch 8.
The kernel's correctness is tested in tests/paged; here the outputs are only cross-checked once.
"""

from __future__ import annotations

import math

import torch
from gpu_bench import load_kernel, paged_args, parse_on_gpu, report


def ragged_lengths(total: int, heads: int, cap: int, gen: torch.Generator) -> list[int]:
    """Per-head lengths summing to `total` (each <= cap), spread like Ada-KV's: a few heads take most."""
    w = torch.rand(heads, generator=gen) ** 3 + 0.05
    raw = (w / w.sum() * total).floor().long().clamp(max=cap)
    lengths = raw.tolist()
    for i in range(total - sum(lengths)):  # hand the rounding remainder to heads with room
        h = i % heads
        while lengths[h] >= cap:
            h = (h + 1) % heads
        lengths[h] += 1
    return lengths


def build_case(batch, heads, group, dim, bs, context, keep, dtype, gen, dev):
    """A paged cache in the flash layout ([nb, bs, H_kv, D], viewed as [nb, H_kv, bs, D]) and the metadata
    of `batch` requests whose heads keep `keep` tokens on average, plus a tail of one partial block."""
    tail = bs // 2 + 1
    lens = [ragged_lengths(keep * heads, heads, context, gen) for _ in range(batch)]
    starts = [[sum(math.ceil(n / bs) for n in row[:h]) for h in range(heads)] for row in lens]
    ncomp = [math.ceil(sum(math.ceil(n / bs) for n in row) / heads) for row in lens]
    width = max(ncomp) + math.ceil(tail / bs)
    num_blocks = batch * width
    cache = torch.randn(2, num_blocks, bs, heads, dim, dtype=dtype, device=dev)
    keys, values = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
    table = torch.randperm(num_blocks, device=dev).view(batch, width)
    meta = dict(block_table=table, lane_start=torch.tensor(starts, device=dev), head_len=torch.tensor(lens, device=dev),
                num_compacted=torch.tensor(ncomp, device=dev), query_req=torch.arange(batch, device=dev),
                query_pos=torch.full((batch,), tail - 1, device=dev))
    read_bytes = sum(sum(row) + tail * heads for row in lens) * dim * 2 * cache.element_size()
    return keys, values, meta, read_bytes, max(max(row) for row in lens) + tail


def copy_bandwidth(dev) -> float:
    from triton.testing import do_bench

    x = torch.empty(2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)  # bytes read + written per second


def main() -> None:
    ap = paged_args(__doc__, "8192,32768,131072", "bench_lane_attention")
    ap.add_argument("--budgets", default="8,32", help="keep 1/N of the context per layer, for each N")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--block-n", type=int, default=64)
    args = parse_on_gpu(ap, "bench_lane_attention")
    from triton.testing import do_bench

    mod = load_kernel("lane_attention_triton")
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    heads, group, dim, bs, batch = args.kv_heads, args.q_heads // args.kv_heads, args.head_dim, args.block_size, args.batch
    copy_bw = copy_bandwidth(dev)
    scale = dim**-0.5
    records = []
    for context in args.contexts:
        query = torch.randn(batch, heads * group, dim, dtype=dtype, device=dev)
        k_dense = torch.randn(batch, heads, context, dim, dtype=dtype, device=dev)
        v_dense = torch.randn_like(k_dense)
        q_sdpa = query.view(batch, heads, group, dim)  # GQA decode = G queries per KV head, no mask
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q_sdpa, k_dense, v_dense, scale=scale)  # noqa: E731
        dense_ms = do_bench(sdpa)
        dense_bytes = 2 * k_dense.numel() * k_dense.element_size()
        rows = [("sdpa-full", 1, dense_ms, dense_bytes)]
        del k_dense, v_dense
        for n in [1] + [int(b) for b in args.budgets.split(",")]:
            keys, values, meta, read_bytes, longest = build_case(batch, heads, group, dim, bs, context, context // n,
                                                                 dtype, gen, dev)
            splits = mod.choose_splits(batch, heads, longest, args.block_n)
            run = lambda: mod.lane_attention(query, keys, values, scale=scale, block_n=args.block_n,  # noqa: E731
                                             num_splits=splits, **meta)
            one = mod.lane_attention(query, keys, values, scale=scale, block_n=args.block_n, num_splits=1, **meta)
            torch.testing.assert_close(run(), one, rtol=2e-2, atol=2e-2)  # splitting changes nothing
            rows.append(("lanes-full" if n == 1 else f"lanes-1/{n}", n, do_bench(run), read_bytes))
            del keys, values
        for name, n, ms, nbytes in rows:
            bw = nbytes / (ms * 1e-3)
            records.append(dict(context=context, variant=name, keep_fraction=1 / n, time_ms=ms,
                                speedup_vs_sdpa_full=dense_ms / ms, bytes_read=nbytes, bandwidth_gb_s=bw / 1e9,
                                fraction_of_copy_bw=bw / copy_bw))
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), copy_bandwidth_gb_s=copy_bw / 1e9, batch=batch, kv_heads=heads,
                  q_heads=heads * group, head_dim=dim, block_size=bs, block_n=args.block_n, dtype="bfloat16",
                  records=records)
    rows = [[str(r["context"]), r["variant"], f"{r['time_ms']:.4f}", f"{r['speedup_vs_sdpa_full']:.2f}x",
             f"{r['bandwidth_gb_s']:.0f}", f"{r['fraction_of_copy_bw']:.0%}"] for r in records]
    report(f"device {result['device']}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)",
           ["context", "variant", "time (ms)", "speed-up vs sdpa-full", "GB/s", "of copy bandwidth"], rows,
           args.out, "bench_lane_attention", result)

if __name__ == "__main__":
    main()
