"""TokenSelect's selection cache in real vLLM: hit rate and greedy agreement with the full cache.

For a few long natural-text prompts, generates greedily with the full cache (`none`) and with
`tokenselect` at each similarity threshold, in one engine (the per-request override path the server
uses), and prints a Markdown table: selection-cache hit rate (hits / selections, every layer and query
piece counted), the share of generated tokens equal to the full cache's, and the length of the common
prefix.

    .venv/bin/python scripts/tokenselect_report.py [--k 256] [--thresholds 0.8,0.9,0.95] [--prompts 3]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: readable counters
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=256, help="tokens selected per query (the budget)")
    ap.add_argument("--thresholds", default="0.8,0.9,0.95")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--context-tokens", type=int, default=3500)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    import pydoc_data.topics as topics
    from vllm import LLM, SamplingParams

    from vllm_kvevict.eval.scoring import prefix_agreement
    from vllm_kvevict.models.smollm2 import prepare_default_model

    llm = LLM(str(prepare_default_model()), dtype="float32", enforce_eager=True, block_size=128, seed=0,
              max_model_len=4608, max_num_batched_tokens=1024,
              additional_config={"kv_evict": {"policy": "tokenselect", "budget": args.k}})
    tok = llm.get_tokenizer()
    text = tok(" ".join(topics.topics.values()))["input_ids"]
    questions = ["Summarize the text above in a few sentences.", "Which Python statements does the text above describe?",
                 "List the main topics of the text above."]
    prompts = []
    for i in range(args.prompts):
        start = 7000 * i
        body = tok.decode(text[start : start + args.context_tokens])
        prompts.append(tok.apply_chat_template([{"role": "user", "content": body + "\n\n" + questions[i % 3]}],
                                               tokenize=False, add_generation_prompt=True))
    counters = llm.llm_engine.engine_core.engine_core.scheduler.kv_counters

    def run(**extra):
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, extra_args=extra)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    full = run(kv_policy="none")
    rows = []
    for threshold in [float(t) for t in args.thresholds.split(",")] + [1.01]:
        h0, m0 = sum(counters.selection_hits.values()), sum(counters.selection_misses.values())
        ours = run(kv_similarity_threshold=min(threshold, 1.0)) if threshold <= 1 else run(kv_similarity_threshold=1.0)
        hits = sum(counters.selection_hits.values()) - h0
        misses = sum(counters.selection_misses.values()) - m0
        same = sum(a == b for f, o in zip(full, ours) for a, b in zip(f, o)) / sum(len(f) for f in full)
        prefix = [prefix_agreement(f, o, args.max_tokens) for f, o in zip(full, ours)]
        rows.append((threshold, hits, misses, same, sum(prefix) / len(prefix)))
        print(f"threshold {threshold}: hit rate {hits / max(1, hits + misses):.1%}, same tokens {same:.1%}", flush=True)

    n_prompt = len(tok(prompts[0])["input_ids"])
    print(f"\n{args.prompts} prompts of ~{n_prompt} tokens, k={args.k}, n_init 128, n_local 512, "
          f"{args.max_tokens} greedy tokens each\n")
    print("| threshold | selections | cache hit rate | tokens equal to full cache | common prefix (share) |")
    print("|---|---|---|---|---|")
    for threshold, hits, misses, same, prefix in rows:
        name = "1.0 (no reuse)" if threshold > 1 else f"{threshold}"
        print(f"| {name} | {hits + misses} | {hits / max(1, hits + misses):.1%} | {same:.1%} | {prefix:.1%} |")


if __name__ == "__main__":
    main()
