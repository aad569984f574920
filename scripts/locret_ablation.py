"""Which Locret settings retrieve 4K needles at budget 1024: stabilizers x kernel_size, against snapkv.

The samples are the eval's `niah` prompts (natural text, one magic number) of 4096 tokens at depths
0.7, 0.8, 0.9 (seeds 1-6, depth 0.8 only from seed 4: 15 prompts). The default model solves all 15
with the full cache at this length (and almost none at depths 0.2-0.5, so those tell nothing). Each
variant is a per-request override (`vllm_xargs`), so one engine runs them all; prefill runs in
1024-token steps, which locret ends at its chunk boundaries.

    .venv/bin/python scripts/locret_ablation.py            # ~45 min on 2 CPU cores
    .venv/bin/python scripts/locret_ablation.py --variants '[{"kv_policy": "locret", "kv_stabilizers": 0}]'

Prints one line per variant (retrieved / solved by the full cache, then the answers) and writes JSON
with --out.
"""

from __future__ import annotations

import argparse
import json
import time

VARIANTS = [
    {"kv_policy": "locret", "kv_stabilizers": 256, "kv_kernel_size": 1},
    {"kv_policy": "locret", "kv_stabilizers": 64, "kv_kernel_size": 1},
    {"kv_policy": "locret", "kv_stabilizers": 256, "kv_kernel_size": 3},
    {"kv_policy": "locret", "kv_stabilizers": 64, "kv_kernel_size": 3},
    {"kv_policy": "locret", "kv_stabilizers": 64, "kv_kernel_size": 5},
    {"kv_policy": "locret", "kv_stabilizers": 64, "kv_kernel_size": 7},
    {"kv_policy": "locret", "kv_stabilizers": 128, "kv_kernel_size": 7},
    {"kv_policy": "snapkv"},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--variants", type=json.loads, default=VARIANTS, help="JSON list of vllm_xargs overrides")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from vllm_kvevict.eval.engine import cpu_defaults

    cpu_defaults(kv_gib=1)
    from vllm import SamplingParams

    from vllm_kvevict.eval.engine import make_llm
    from vllm_kvevict.eval.scoring import contains_all
    from vllm_kvevict.eval.tasks import hf_builder, make_sample
    from vllm_kvevict.models.smollm2 import prepare_default_model

    # server-wide locret (as in tests/e2e/test_vllm_locret.py); every variant is a per-request override
    llm = make_llm(str(prepare_default_model()), 4608, kv_blocks=80, max_num_batched_tokens=1024,
                   additional_config={"kv_evict": {"policy": "locret", "budget": args.budget}})
    builder = hf_builder(llm.get_tokenizer())
    samples = [make_sample(builder, "niah", 4096, d, 0, seed=s) for s in range(1, 7) for d in (0.7, 0.8, 0.9)
               if not (d == 0.8 and s < 4)]
    prompts = [{"prompt_token_ids": list(s.prompt_ids)} for s in samples]

    def run(extra: dict) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=12, extra_args=extra)
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=True)]

    started = time.time()
    full = run({"kv_policy": "none"})
    solved = [i for i, (text, s) in enumerate(zip(full, samples)) if contains_all(text, s.answers)]
    print(f"full cache: {len(solved)}/{len(samples)}", flush=True)
    results = [{"variant": {"kv_policy": "none"}, "retrieved": len(solved), "of": len(samples), "answers": full}]
    for variant in args.variants:
        extra = {"kv_budget": args.budget, **variant}
        texts = run(extra)
        hits = sum(contains_all(texts[i], samples[i].answers) for i in solved)
        print(f"{json.dumps(extra)}: {hits}/{len(solved)}  {[texts[i] for i in solved]}", flush=True)
        results.append({"variant": extra, "retrieved": hits, "of": len(solved), "answers": texts})
    print(f"{time.time() - started:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"expected": [s.answers[0] for s in samples], "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
