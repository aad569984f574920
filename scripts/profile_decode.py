"""Where a decode step's time goes with many compacted requests running: one engine, for each policy the
same `--requests` prompts prefilled and compacted, then `--steps` decode steps (every request decoding)
profiled with cProfile. Prints (and with --out writes) a Markdown table: ms per decode step by part.

    .venv/bin/python scripts/profile_decode.py [--policies none,snapkv,ada-snapkv] [--requests 16]
        [--prompt-len 1024] [--budget 128] [--steps 20] [--out docs/profile_decode.md]

Parts are cumulative times of named functions (nested parts are not subtracted from `engine step`):
`model forward` is vLLM's whole forward (attention included), `attention (vLLM kernel)` the backend's
own kernel, the `core:` rows ours, `schedule` + `update` the scheduler's bookkeeping.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

# (label, file suffix, function name): cumulative time of that function per decode step
PARTS = [
    ("engine step", "v1/engine/llm_engine.py", "step"),
    ("schedule", "v1/core/sched/scheduler.py", "schedule"),
    ("update from output", "v1/core/sched/scheduler.py", "update_from_output"),
    ("execute model (worker)", "v1/worker/gpu_worker.py", "execute_model"),
    ("model forward", "v1/worker/gpu_model_runner.py", "_model_forward"),
    ("attention (vLLM kernel)", "v1/attention/backends/cpu_attn.py", "forward"),
    ("core: plan_step (metadata)", "core/eviction.py", "plan_step"),
    ("core: after_attention", "core/eviction.py", "after_attention"),
    ("core: lanes on vLLM's kernel", "integration/vllm/cpu_lanes.py", "vllm_lane_attention"),
    ("core: lane sequences (addresses)", "paged/lanes.py", "lane_sequences"),
    ("core: lane attention (torch twin)", "paged/lanes.py", "lane_attention"),
    ("sampling", "v1/worker/gpu_model_runner.py", "_sample"),
]


def part_times(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """ms per step of each part (cumulative time of the function, summed over its matches)."""
    out = {label: 0.0 for label, _, _ in PARTS}
    for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for label, suffix, name in PARTS:
            if func == name and path.endswith(suffix):
                out[label] += ct * 1000 / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="none,snapkv,ada-snapkv")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args()

    from vllm import SamplingParams, TokensPrompt

    from vllm_kvevict.eval.engine import make_llm
    from vllm_kvevict.eval.tasks import hf_builder, make_sample
    from vllm_kvevict.models.smollm2 import prepare_default_model

    model = str(prepare_default_model())
    llm = make_llm(model, max_model_len=args.prompt_len + 512, block_size=128, max_num_seqs=args.requests)
    builder = hf_builder(llm.get_tokenizer())
    prompts = [list(make_sample(builder, "agreement", args.prompt_len, None, i, 0).prompt_ids)
               for i in range(args.requests)]
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    columns = {}
    for policy in args.policies.split(","):
        extra = {"kv_policy": policy} if policy == "none" else {"kv_policy": policy, "kv_budget": args.budget}
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True, extra_args=extra)
        for i, p in enumerate(prompts):
            engine.add_request(f"{policy}-{i}", TokensPrompt(prompt_token_ids=p), params)
        while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):
            engine.step()  # prefill (and compaction) of every request
        engine.step()  # the first all-decode step (lazy per-layer set-up)
        assert len(sched.running) == args.requests, f"{policy}: {len(sched.running)} running"
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            engine.step()
        profiler.disable()
        columns[policy] = part_times(pstats.Stats(profiler), args.steps)
        while engine.has_unfinished_requests():
            engine.step()
        print(f"{policy}: {columns[policy]['engine step']:.1f} ms per decode step")
    names = list(columns)
    lines = [f"Decode step at {args.requests} running requests of {args.prompt_len}-token prompts (budget "
             f"{args.budget} for the evicting policies), default model, CPU, cProfile over {args.steps} steps; "
             "ms per step (nested parts are included in their parents).", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, _, _ in PARTS:
        lines.append(f"| {label} | " + " | ".join(f"{columns[n][label]:.1f}" for n in names) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Decode-step profile\n\n`.venv/bin/python scripts/profile_decode.py "
                    f"--policies {args.policies} --requests {args.requests} --prompt-len {args.prompt_len} "
                    f"--budget {args.budget} --steps {args.steps}`\n\n" + table)


if __name__ == "__main__":
    main()
