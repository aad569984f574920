"""Which Locret settings retrieve 4K needles at budget 1024: stabilizers x kernel_size, against snapkv.

The samples are the eval's `niah` prompts (natural text, one magic number) of 4096 tokens at depths
0.7, 0.8, 0.9 (seeds 1-6, depth 0.8 only from seed 4: 15 prompts). The default model solves all 15
with the full cache at this length (and almost none at depths 0.2-0.5, so those tell nothing). Each
variant is a per-request override (`vllm_xargs`), so one engine runs them all; prefill runs in
1024-token steps, which locret ends at its chunk boundaries.

    .venv/bin/python scripts/locret_ablation.py            # ~37 min on 2 CPU cores
    .venv/bin/python scripts/locret_ablation.py --variants '[{"kv_policy": "locret", "kv_stabilizers": 0}]'

With --summaries the prompts are instead four 3900-token pieces of Python's reference docs with "What
programming language is the text above about?" (the e2e test's prompt and three more), 40 tokens each,
scored by the e2e test's fluency rule (names Python, >= 15 words, at least half of them distinct):

    .venv/bin/python scripts/locret_ablation.py --summaries --budget 512   # ~12 min

Prints one line per variant (passed / passed by the full cache, then the answers) and writes JSON
with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
    parser.add_argument("--summaries", action="store_true", help="fluency on 4K summary prompts, not needles")
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
    tok = llm.get_tokenizer()
    if args.summaries:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
        from tests.e2e.engine import fluent, long_prompt

        prompts = [long_prompt(tok, 3900, offset=o) for o in (0, 4000, 8000, 12000)]  # text, as the e2e test
        expected, max_tokens = ["Python"] * len(prompts), 40
    else:
        builder = hf_builder(tok)
        samples = [make_sample(builder, "niah", 4096, d, 0, seed=s) for s in range(1, 7) for d in (0.7, 0.8, 0.9)
                   if not (d == 0.8 and s < 4)]
        prompts = [{"prompt_token_ids": list(s.prompt_ids)} for s in samples]
        expected, max_tokens = [s.answers[0] for s in samples], 12

    def passes(text: str, answer: str) -> bool:
        if args.summaries:
            return answer in text and fluent(text)
        return bool(contains_all(text, [answer]))

    def run(extra: dict) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=True)]

    started = time.time()
    full = run({"kv_policy": "none"})
    solved = [i for i, text in enumerate(full) if passes(text, expected[i])]
    print(f"full cache: {len(solved)}/{len(prompts)}", flush=True)
    results = [{"variant": {"kv_policy": "none"}, "passed": len(solved), "of": len(prompts), "answers": full}]
    # needles count where the full cache retrieves; fluency counts on every prompt
    scored = range(len(prompts)) if args.summaries else solved
    for variant in args.variants:
        extra = {"kv_budget": args.budget, **variant}
        texts = run(extra)
        hits = sum(passes(texts[i], expected[i]) for i in scored)
        print(f"{json.dumps(extra)}: {hits}/{len(scored)}  {[texts[i] for i in scored]}", flush=True)
        results.append({"variant": extra, "passed": hits, "of": len(scored), "answers": texts})
    print(f"{time.time() - started:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"expected": expected, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
