"""GPU benchmark: TokenSelect decode attention (selection-cache hit and miss) vs dense attention.

Needs a CUDA GPU, torch and Triton; not vLLM. For each context length, one decode query per request
over a paged cache (flash layout, permuted block table), timed side by side in one run:

    dense        torch SDPA (flash) over the full contiguous K/V
    ts-miss      paged dot product over every candidate + fused soft vote + top-k + sparse attention
    ts-hit       sparse attention over cached indices only (a selection-cache hit)

and the ratios dense / ts. Defaults: a Llama-3-8B layer (32 query heads, 8 KV heads, head size 128,
bf16), k = 2048, n_init 128, n_local 512, block size 16.

    python scripts/bench_token_select.py [--contexts 32768,131072] [--k 2048] [--out DIR]
"""

from __future__ import annotations


import torch
from gpu_bench import load_kernel, paged_args, parse_on_gpu, report


def main() -> None:
    ap = paged_args(__doc__, "32768,131072", "bench_token_select")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--n-local", type=int, default=512)
    ap.add_argument("--q-heads", type=int, default=32)
    args = parse_on_gpu(ap, "bench_token_select")
    from triton.testing import do_bench

    from vllm_kvevict.policies.soft_vote import with_fixed_windows

    ts = load_kernel("selection_triton")
    dev, dtype = "cuda", torch.bfloat16
    heads, dim, bs = args.kv_heads, args.head_dim, args.block_size
    group = args.q_heads // heads
    scale = dim**-0.5
    records = []
    for ctx in args.contexts:
        nblocks = -(-(ctx + 1) // bs)
        cache = torch.randn(2, nblocks, bs, heads, dim, dtype=dtype, device=dev)
        keys, values = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
        row = torch.randperm(nblocks, device=dev).to(torch.int32)
        query = torch.randn(1, heads * group, dim, dtype=dtype, device=dev)
        positions = torch.arange(args.n_init, ctx - args.n_local, device=dev)

        def miss():
            scores = ts.paged_scores(query[0], keys, row, positions)
            picked = positions[ts.vote_topk(scores, args.k)]
            selected = with_fixed_windows(picked, ctx, args.n_init, args.n_local)
            return ts.sparse_attention(query, keys, values, row, selected, ctx, scale)

        picked = positions[torch.randperm(positions.numel(), device=dev)[: args.k]]
        selected = with_fixed_windows(picked, ctx, args.n_init, args.n_local)
        hit = lambda: ts.sparse_attention(query, keys, values, row, selected, ctx, scale)  # noqa: E731
        k_dense = torch.randn(1, heads, ctx, dim, dtype=dtype, device=dev)
        v_dense = torch.randn_like(k_dense)
        q_sdpa = query.view(1, heads, group, dim)
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(q_sdpa, k_dense, v_dense, scale=scale)  # noqa: E731
        t_dense, t_miss, t_hit = do_bench(dense), do_bench(miss), do_bench(hit)
        records.append(dict(context=ctx, k=args.k, dense_ms=t_dense, miss_ms=t_miss, hit_ms=t_hit,
                            speedup_miss=t_dense / t_miss, speedup_hit=t_dense / t_hit))
        del cache, k_dense, v_dense
        torch.cuda.empty_cache()
    rows = [[str(r["context"]), f"{r['dense_ms']:.4f}", f"{r['miss_ms']:.4f}", f"{r['hit_ms']:.4f}",
             f"{r['speedup_miss']:.2f}x", f"{r['speedup_hit']:.2f}x"] for r in records]
    report(f"device {torch.cuda.get_device_name()}, k={args.k}, batch 1 decode query, bf16",
           ["context", "dense (ms)", "tokenselect miss (ms)", "hit (ms)", "dense / miss", "dense / hit"], rows,
           args.out, "bench_token_select", dict(device=torch.cuda.get_device_name(), records=records))

if __name__ == "__main__":
    main()
