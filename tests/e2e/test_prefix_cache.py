"""Prefix caching with eviction inside real vLLM (copy-on-compact): the default model, fp32, CPU.

One engine with prefix caching on (vLLM's default), server-wide snapkv at budget 256, 128-token blocks,
a 48-block pool. A request compacts its prompt into fresh blocks and hands the prompt's own blocks back
to the pool with their hashes, so the next request with the same document reads the full-fidelity KV
and prefills only what is new. The references (prefix caching off) run in a fresh process.
"""

from __future__ import annotations

import pytest

from vllm_kvevict.core.state import KeptLog, worker_state

from tests.e2e.engine import BLOCK, find_request, generate_in_subprocess, greedy, make_llm, run_steps, scheduler

pytestmark = pytest.mark.e2e

BUDGET = 256
POOL = dict(num_gpu_blocks_override=48, max_model_len=4096, max_num_batched_tokens=512)
KEYS = ("violet-harbor", "amber-falcon")
VALUES = ("4817263", "9352081")
ANSWER = "The special magic number for {key} mentioned in the provided text is"


@pytest.fixture(scope="module")
def llm():
    return make_llm({"policy": "snapkv", "budget": BUDGET}, **POOL)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def document(tok, tokens: int = 1900) -> str:
    """Natural text with two needles: KEYS[0]'s number at a quarter of it, KEYS[1]'s at three quarters."""
    from vllm_kvevict.eval.tasks import natural_sentences

    sentences, text, i = natural_sentences(), [], 0
    needles = {int(tokens * 0.25): 0, int(tokens * 0.75): 1}
    used = 0
    while used < tokens:
        for at, k in list(needles.items()):
            if used >= at:
                text.append(f"One of the special magic numbers for {KEYS[k]} is: {VALUES[k]}.")
                del needles[at]
        text.append(sentences[i % len(sentences)])
        used += len(tok(" " + text[-1], add_special_tokens=False)["input_ids"])
        i += 1
    return " ".join(text)


def question(key: str) -> str:
    return f"What is the special magic number for {key} mentioned in the provided text?"


def chat(tok, turns: list[tuple[str, str]], key: str) -> list[int]:
    """Token ids of a conversation (user, assistant) pairs, then the answer prefix for `key`."""
    messages = []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant:
            messages.append({"role": "assistant", "content": assistant})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ANSWER.format(key=key)
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)


def cached_blocks(llm) -> dict[int, object]:
    """block id -> block of every block the prefix cache can hand out."""
    pool = scheduler(llm).kv_cache_manager.block_pool
    out = {}
    for entry in pool.cached_block_hash_to_block._cache.values():
        for block in (entry.values() if isinstance(entry, dict) else [entry]):
            out[block.block_id] = block
    return out


def compacted_blocks(llm, request_id: str) -> list:
    """The blocks of a request's compacted region (the first n of its row), as the scheduler holds them."""
    request = find_request(llm, request_id)
    manager = scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]
    comp = scheduler(llm).kv_plan(request).compaction
    return manager.req_to_blocks[request.request_id][: comp.kept_blocks]


def held(llm, request) -> int:
    manager = scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]
    return sum(1 for b in manager.req_to_blocks[request.request_id] if not b.is_null)


def reference(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The same requests on a server with prefix caching off (in-place compaction), in a fresh process."""
    return generate_in_subprocess([{"prompt_token_ids": p} for p in prompts], max_tokens, stock=False,
                                  enable_prefix_caching=False, **POOL,
                                  additional_config={"kv_evict": {"policy": "snapkv", "budget": BUDGET}})


def test_a_shared_document_is_read_from_the_cache_at_full_fidelity(llm, tok):
    """Two questions about one document, one after the other: the second reads the document's blocks
    from the prefix cache (vLLM's own count), both answers equal a cache-off server's, and the first
    request holds the in-place rule's blocks, its compacted ones fresh blocks the cache never hands out."""
    doc = document(tok)
    first, second = (chat(tok, [(doc + "\n\n" + question(k), "")], k) for k in KEYS)
    seen = {}

    def on_step(_):
        request = find_request(llm, "q0")
        if request is None or "q0" in seen:
            return
        comp = scheduler(llm).kv_plan(request).compaction
        if request.num_computed_tokens > comp.prompt_len:  # compacted, and its blocks swapped
            tail = -(-(request.num_computed_tokens - comp.compactable_tokens) // BLOCK)
            blocks = compacted_blocks(llm, "q0")
            seen["q0"] = (held(llm, request), comp.kept_blocks + tail, [b.block_hash for b in blocks],
                          {b.block_id for b in blocks} & set(cached_blocks(llm)))

    out_first = run_steps(llm, [("q0", prompt(first), greedy(16))], on_step=on_step)["q0"]
    holds, rule, hashes, shared_with_cache = seen["q0"]
    assert holds == rule and all(h is None for h in hashes) and not shared_with_cache
    second_out = llm.generate([prompt(second)], greedy(16), use_tqdm=False)[0]
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common > 1500  # the document
    assert second_out.num_cached_tokens == min(common, len(second) - 32) // BLOCK * BLOCK
    assert [out_first, list(second_out.outputs[0].token_ids)] == reference([first, second], 16)


def kept_anywhere(kept: KeptLog, req_prefix: str, positions: range) -> tuple[int, int]:
    """(layer, head) pairs that kept every one of `positions`, of all pairs, for the request."""
    pairs = [heads for (rid, _), heads in kept.items.items() if rid.startswith(req_prefix)]
    total = sum(len(h) for h in pairs)
    whole = sum(1 for heads in pairs for h in heads if all(p in set(h.tolist()) for p in positions))
    return whole, total


def value_span(tok, ids: list[int], value: str) -> range:
    """The shortest run of token positions whose text contains `value` (the needle's number)."""
    for end in range(1, len(ids) + 1):
        if value in tok.decode(ids[max(0, end - 16) : end]):
            start = end - 1
            while value not in tok.decode(ids[start:end]):
                start -= 1
            return range(start, end)
    raise AssertionError(f"{value} is not in the prompt")


def test_a_follow_up_turn_reads_the_full_document_not_turn_ones_compaction(llm, tok):
    """Turn 1 asks for KEYS[0]'s number at budget 128; its compaction drops KEYS[1]'s number from most
    (layer, KV head) pairs. Turn 2 (turn 1 + its answer + a question about KEYS[1]) reads the document from
    the prefix cache at full fidelity, is compacted with its own question, and answers as the full cache."""
    doc = document(tok)
    state = worker_state()
    state.kept = KeptLog()
    try:
        t1 = chat(tok, [(doc + "\n\n" + question(KEYS[0]), "")], KEYS[0])
        out1 = run_steps(llm, [("turn1", prompt(t1), greedy(12, kv_budget=128))])["turn1"]
        kept = state.kept
    finally:
        state.kept = None
    answer = tok.decode(out1, skip_special_tokens=True)
    assert VALUES[0] in answer
    whole, total = kept_anywhere(kept, "turn1", value_span(tok, t1, VALUES[1]))
    assert total == 30 * 3 and whole < total // 3  # measured: 22 of 90 pairs still hold all its digits
    t2 = chat(tok, [(doc + "\n\n" + question(KEYS[0]), ANSWER.format(key=KEYS[0]) + answer),
                    (question(KEYS[1]), "")], KEYS[1])
    full, evicted = llm.generate([prompt(t2), prompt(t2)], [greedy(8, kv_policy="none"), greedy(8, kv_budget=128)],
                                 use_tqdm=False)
    assert evicted.num_cached_tokens >= (len(t1) - 32) // BLOCK * BLOCK  # turn 1's document came from the cache
    assert VALUES[1] in full.outputs[0].text and evicted.outputs[0].text == full.outputs[0].text


def test_under_pool_pressure_the_cache_gives_way_and_never_hands_out_a_compacted_block(llm, tok):
    """Eight documents at once in a 47-block pool: the prompts' released blocks are evicted by vLLM's LRU
    as new prompts need room, every request finishes as on a cache-off server, no compacted block is ever
    hashed or in the cache, and every block comes back."""
    docs = [document(tok, 1700 + 20 * i) + f" (Part {i}.)" for i in range(8)]
    prompts = [chat(tok, [(d + "\n\n" + question(KEYS[i % 2]), "")], KEYS[i % 2]) for i, d in enumerate(docs)]
    sched = scheduler(llm)
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    leaks = []

    def on_step(_):
        cached = set(cached_blocks(llm))
        for request in sched.running:
            comp = sched.kv_plan(request).compaction
            if comp is not None and request.request_id in sched.kv_freed:
                for block in manager.req_to_blocks[request.request_id][: comp.kept_blocks]:
                    if block.block_hash is not None or block.block_id in cached:
                        leaks.append((request.request_id, block.block_id))

    out = run_steps(llm, [(f"p{i}", prompt(p), greedy(8)) for i, p in enumerate(prompts)], on_step=on_step)
    assert not leaks
    assert [out[f"p{i}"] for i in range(8)] == reference(prompts, 8)
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == POOL["num_gpu_blocks_override"] - 1  # all back (the null block aside)


def test_a_selecting_request_shares_only_what_it_computed_with_full_attention(llm, tok):
    """TokenSelect (a per-request override) attends to everything until its first selecting context
    (n_init + k + n_local tokens), sparsely after it: a `none` request about the same document reads from
    the cache only the blocks before that point, a later TokenSelect request reads no further either,
    and a second `none` request reads the whole document (the first `none` one offered it)."""
    select = dict(kv_policy="tokenselect", kv_budget=256, kv_n_init=16, kv_n_local=128)
    first_selecting = 16 + 256 + 128 + 1
    doc = "Report on the selecting request.\n\n" + document(tok)
    prompts = [chat(tok, [(doc + "\n\n" + q, "")], KEYS[0]) for q in (
        question(KEYS[0]), question(KEYS[1]), "Summarise the text.", "Which keys does the text mention?")]
    cached = []
    for ids, extra in zip(prompts, (select, {"kv_policy": "none"}, select, {"kv_policy": "none"})):
        cached.append(llm.generate([prompt(ids)], greedy(2, **extra), use_tqdm=False)[0].num_cached_tokens)
    shared = first_selecting // BLOCK * BLOCK
    common = min(next(i for i, (a, b) in enumerate(zip(prompts[1], prompts[3])) if a != b), len(prompts[3]) - 1)
    assert cached == [0, shared, shared, common // BLOCK * BLOCK]
    assert common > 1500
