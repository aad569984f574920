"""Memory of Ada-KV in the paged cache: blocks per request for snapkv, ada-snapkv padded, ada-snapkv ragged.

Runs real vLLM (in-process engine core, the default model, CPU settings of DESIGN.md section 2) and,
for every prompt length and budget, measures the blocks each request holds after compaction:

    snapkv          uniform per-head budgets (measured)
    ada-snapkv      ragged head-lanes, what the plugin does (measured)
    ada padded      Ada-KV's token-level per-head budgets with every head padded to the longest one,
                    the only way to hold ragged heads without head-lanes (computed in the same run from
                    each layer's token-level Ada-KV plan on the same KV: longest head, rounded up to
                    blocks by the same rule, maxed over layers, plus the same tail)

    .venv/bin/python scripts/ragged_memory.py [--budgets 128,256,512] [--contexts 1900,3900]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: inspectable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

BLOCK = 128


def _record_padded(store: list[int]):
    """Wrap plan_lanes so each ragged compaction also records the token-level Ada plan's longest head."""
    from vllm_kvevict.policies.eviction import EvictionPolicy

    original = EvictionPolicy.plan_lanes

    def plan_lanes(self, view, region, total_lanes, block_size):
        store.append(self.plan(view).max_len)
        return original(self, view, region, total_lanes, block_size)

    EvictionPolicy.plan_lanes = plan_lanes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--contexts", default="1900,3900", help="context tokens before the question (~2K, ~4K prompts)")
    args = ap.parse_args()

    import pydoc_data.topics as topics
    from vllm import LLM, SamplingParams

    from vllm_kvevict.paged.layout import plan_compaction
    from vllm_kvevict.models.smollm2 import prepare_default_model

    padded_store: list[int] = []
    _record_padded(padded_store)
    llm = LLM(str(prepare_default_model()), dtype="float32", enforce_eager=True, block_size=BLOCK, seed=0,
              max_model_len=4352, additional_config={"kv_evict": {"policy": "snapkv", "budget": 256}})
    tok = llm.get_tokenizer()
    text_ids = tok(" ".join(topics.topics.values()))["input_ids"]
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]

    def held_after(prompt: str, policy: str, budget: int) -> tuple[int, int, int]:
        params = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"kv_policy": policy, "kv_budget": budget})
        rid = engine.add_request(f"mem-{policy}-{budget}-{len(prompt)}", prompt, params)
        held, n_prompt = [], 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                n_prompt = len(out.prompt_token_ids)
            blocks = manager.req_to_blocks.get(rid)
            if blocks is not None and rid in sched.requests:
                held.append(sum(1 for b in blocks if not b.is_null))
        return n_prompt, max(held), held[-1]

    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        question = "What programming language is the text above about?"
        prompt = tok.apply_chat_template([{"role": "user", "content": tok.decode(text_ids[:context]) + "\n\n" + question}],
                                         tokenize=False, add_generation_prompt=True)
        for budget in [int(b) for b in args.budgets.split(",")]:
            n_prompt, before, uniform = held_after(prompt, "snapkv", budget)
            padded_store.clear()
            _, _, ragged = held_after(prompt, "ada-snapkv", budget)
            longest = max(padded_store)
            comp = plan_compaction(n_prompt, budget, BLOCK)
            padded = plan_compaction(n_prompt, longest, BLOCK).kept_blocks + (ragged - comp.kept_blocks)
            rows.append((n_prompt, budget, before, uniform, padded, ragged, longest))
            print(f"prompt {n_prompt}, budget {budget}: snapkv {uniform}, ada padded {padded} "
                  f"(longest head {longest} tokens), ada ragged {ragged} blocks", flush=True)

    print(f"\nblock size {BLOCK}; blocks a request holds after compaction (full cache: 'before')\n")
    print("| prompt tokens | budget | before | snapkv | ada-snapkv padded | ada-snapkv ragged | padded / ragged |")
    print("|---|---|---|---|---|---|---|")
    for n_prompt, budget, before, uniform, padded, ragged, longest in rows:
        print(f"| {n_prompt} | {budget} | {before} | {uniform} | {padded} (longest head {longest}) | {ragged} | "
              f"{padded / ragged:.2f}x |")


if __name__ == "__main__":
    main()
