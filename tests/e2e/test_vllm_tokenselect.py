"""TokenSelect inside real vLLM (in-process engine core, the default model, fp32, eager, CPU).

One engine: server-wide `tokenselect` with k=256 (n_init 128, n_local 512: selection starts past 896
cached tokens), 1024-token prefill chunks so later chunks of a 4K prompt select too.
"""

from __future__ import annotations

import pytest

from tests.e2e.engine import greedy, long_prompt, make_llm, retrieval_samples, run_steps, scheduler

pytestmark = pytest.mark.e2e

K = 256


@pytest.fixture(scope="module")
def llm():
    return make_llm({"policy": "tokenselect", "budget": K}, max_model_len=4608, num_gpu_blocks_override=80,
                    max_num_batched_tokens=1024)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def generate(llm, prompts, **extra):
    outs = llm.generate(prompts, greedy(**extra), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs]


def test_short_prompts_are_token_identical_to_none(llm, tok):
    prompts = [long_prompt(tok, 300), long_prompt(tok, 700, offset=3000)]  # under n_init + k + n_local
    counters = scheduler(llm).kv_counters
    misses = sum(counters.selection_misses.values())
    ours, text = generate(llm, prompts)
    full, _ = generate(llm, prompts, kv_policy="none")
    assert ours == full
    assert sum(counters.selection_misses.values()) == misses  # nothing was selected
    assert "Python" in text[0]


def test_4k_retrieval_with_k_256_succeeds_wherever_the_full_cache_succeeds(llm, tok):
    from vllm_kvevict.eval.scoring import contains_all

    samples = retrieval_samples(tok, 4096)
    prompts = [{"prompt_token_ids": list(s.prompt_ids)} for s in samples]
    counters = scheduler(llm).kv_counters
    hits, misses = sum(counters.selection_hits.values()), sum(counters.selection_misses.values())
    _, full = generate(llm, prompts, kv_policy="none", max_tokens=12)
    _, ours = generate(llm, prompts, max_tokens=12)
    solved = [contains_all(t, s.answers) for t, s in zip(full, samples)]
    assert sum(solved) >= 2, full  # the model can do the task at this length
    for ok, text, sample in zip(solved, ours, samples):
        if ok:
            assert contains_all(text, sample.answers), (text, sample.answers)
    new_misses = sum(counters.selection_misses.values()) - misses
    assert new_misses >= len(samples) * 30  # every layer selected for every request (prefill chunks and decode)
    assert sum(counters.selection_hits.values()) - hits >= 0


def test_batched_requests_of_different_lengths_match_running_alone(llm, tok):
    """Selection is per request: batching must not change a token. Prompts under 1024 tokens prefill
    without selecting however the scheduler splits them (no prefill piece starts past 896), so every
    selection here is a decode query's own (the first two prompts select from their first tokens on)."""
    prompts = [long_prompt(tok, 950), long_prompt(tok, 880, offset=5000), long_prompt(tok, 500, offset=9000)]
    params = greedy(max_tokens=32)
    counters = scheduler(llm).kv_counters
    misses = sum(counters.selection_misses.values())
    alone = [run_steps(llm, [(f"alone-{i}", p, params)])[f"alone-{i}"] for i, p in enumerate(prompts)]
    assert sum(counters.selection_misses.values()) - misses >= 2 * 30  # decode queries selected
    together = run_steps(llm, [(f"both-{i}", p, params) for i, p in enumerate(prompts)])
    assert [together[f"both-{i}"] for i in range(3)] == alone


def test_selection_cache_hits_and_reuse(llm, tok):
    """With threshold -1 every query after the first reuses its layer's selection: hits appear and the
    answer is still text; with threshold 1.0 nothing is reused."""
    prompt = long_prompt(tok, 1900)
    counters = scheduler(llm).kv_counters
    h0, m0 = sum(counters.selection_hits.values()), sum(counters.selection_misses.values())
    generate(llm, [prompt], kv_similarity_threshold=1.0, max_tokens=8)
    h1, m1 = sum(counters.selection_hits.values()), sum(counters.selection_misses.values())
    assert h1 == h0 and m1 - m0 >= 8 * 30
    _, text = generate(llm, [prompt], kv_similarity_threshold=-1.0, max_tokens=8)
    h2, m2 = sum(counters.selection_hits.values()), sum(counters.selection_misses.values())
    assert h2 - h1 >= 7 * 30 and m2 - m1 == 30  # one miss per layer, then only hits
    assert text[0].strip()
