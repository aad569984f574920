"""One ~2K-token prompt through real vLLM under each policy: blocks before/after compaction, and the
first generated tokens next to the full cache's. Prints a Markdown table.

    .venv/bin/python scripts/eviction_report.py [--budget 256] [--max-tokens 40] [--policies none,ada-snapkv]

CPU settings of DESIGN.md section 2 (fp32, eager, in-process engine core so the scheduler can be read).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

QUESTION = "What programming language is the text above about? Explain in a few sentences."


def main() -> None:
    from vllm_kvevict.policies.registry import names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policies", default=",".join(names()),
                    help="comma-separated, in order (default: every registered policy)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--context-tokens", type=int, default=1900)
    ap.add_argument("--question", default=QUESTION, help="asked after the context")
    args = ap.parse_args()

    import pydoc_data.topics as topics
    from vllm import LLM, SamplingParams

    from vllm_kvevict.models.smollm2 import prepare_default_model

    llm = LLM(str(prepare_default_model()), dtype="float32", enforce_eager=True, block_size=128, seed=0,
              max_model_len=4096, additional_config={"kv_evict": {"policy": "snapkv", "budget": args.budget}})
    tok = llm.get_tokenizer()
    ids = tok(" ".join(topics.topics.values()))["input_ids"][: args.context_tokens]
    prompt = tok.apply_chat_template([{"role": "user", "content": tok.decode(ids) + "\n\n" + args.question}],
                                     tokenize=False, add_generation_prompt=True)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]

    rows = []
    for policy in args.policies.split(","):
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                extra_args={"kv_policy": policy, "kv_budget": args.budget} if policy != "none"
                                else {"kv_policy": "none"})
        rid = engine.add_request(f"report-{policy}", prompt, params)
        held, text, n_prompt = [], "", 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    text, n_prompt = out.outputs[0].text, len(out.prompt_token_ids)
            blocks = manager.req_to_blocks.get(rid)
            if blocks is not None and rid in sched.requests:
                held.append(sum(1 for b in blocks if not b.is_null))
        rows.append((policy, n_prompt, max(held), held[-1], text))
        print(f"{policy}: {max(held)} -> {held[-1]} blocks", flush=True)

    print(f"\nprompt {rows[0][1]} tokens, budget {args.budget}, block size 128, greedy, first {args.max_tokens} tokens\n")
    print("| policy | blocks before | blocks after | output |")
    print("|---|---|---|---|")
    for policy, _, before, after, text in rows:
        print(f"| {policy} | {before} | {after} | {text.strip()!r} |")


if __name__ == "__main__":
    main()
