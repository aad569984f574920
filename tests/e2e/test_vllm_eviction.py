"""Eviction inside real vLLM (in-process engine core, the default model, fp32, eager, CPU).

One engine runs all of it: server-wide policy snapkv at budget 256, a 20-block pool (one ~2K prompt
fits without eviction, two fit with it), 256-token prefill chunks. Other policies are selected per
request through `extra_args` (the OpenAI body's `vllm_xargs`), the same path the server uses.
"""

from __future__ import annotations

import re

import pytest

from vllm_kvevict.policies.declaration import KeptLayout, LayerBudget, Trigger
from vllm_kvevict.policies.registry import get_spec

from tests.e2e.engine import (
    BLOCK,
    SMALL_POOL,
    free_blocks,
    generate_in_subprocess,
    greedy,
    held_blocks,
    find_request,
    long_prompt,
    make_llm,
    run_steps,
    scheduler,
    stock_generate,
)

pytestmark = pytest.mark.e2e

BUDGET = 256

def _declared(**match) -> list[str]:
    """Registered policies whose declaration (built with their defaults) has these fields."""
    from vllm_kvevict.policies.config import PolicyConfig
    from vllm_kvevict.policies.registry import names

    declarations = {n: PolicyConfig(n).build().declaration for n in names("evict")}
    return [n for n, d in declarations.items() if all(getattr(d, k) == v for k, v in match.items())]


# every policy that compacts once the prompt is in (per-chunk eviction has its own test file)
POLICIES = _declared(trigger=Trigger.AFTER_PREFILL)
UNIFORM = _declared(trigger=Trigger.AFTER_PREFILL, layer_budget=LayerBudget.UNIFORM)


@pytest.fixture(scope="module")
def llm():
    return make_llm({"policy": "snapkv", "budget": BUDGET}, **SMALL_POOL)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def prompt_a(tok):
    return long_prompt(tok, 1900)


@pytest.fixture(scope="module")
def prompt_b(tok):
    return long_prompt(tok, 1900, offset=6000, question="Summarize the text above in one sentence.")


@pytest.fixture(scope="module")
def short_prompt(tok):
    return tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)


def n_tokens(tok, prompt: str) -> int:
    return len(tok(prompt)["input_ids"])


def compaction(llm, prompt_len: int, policy: str, **overrides):
    from vllm_kvevict.core.requests import request_plan, server_config

    sched = scheduler(llm)
    server = server_config(sched.vllm_config.additional_config)
    return request_plan(server, {"kv_policy": policy, **overrides}, prompt_len, BLOCK, sched.kv_num_layers).compaction


def assert_fluent(text: str) -> None:
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 5, text
    assert len(set(w.lower() for w in words)) >= 4, text  # not one word repeated
    assert sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", "")), text  # mostly letters


# ---- identity with stock vLLM ----------------------------------------------------------------------
def test_none_and_budget_above_prompt_are_token_identical_to_stock_vllm(llm, prompt_a, short_prompt):
    stock = stock_generate([prompt_a, short_prompt], **SMALL_POOL)
    counters = scheduler(llm).kv_counters
    before = sum(counters.compactions.values())
    for extra in ({"kv_policy": "none"}, {"kv_budget": 4096}, {"kv_policy": "streamingllm", "kv_budget": 3000},
                  {"kv_policy": "ada-snapkv", "kv_budget": 2048}):
        outs = llm.generate([prompt_a, short_prompt], greedy(**extra), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == stock, extra
    # the short prompt under the server's own policy (prompt < budget): untouched
    outs = llm.generate([short_prompt], greedy(), use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == stock[1]
    assert sum(counters.compactions.values()) == before  # nothing was compacted
    assert "Paris" in outs[0].outputs[0].text


def test_server_policy_none_is_token_identical_to_stock_vllm(prompt_a, short_prompt):
    stock = stock_generate([prompt_a, short_prompt], **SMALL_POOL)
    ours = generate_in_subprocess([prompt_a, short_prompt], stock=False,
                                  additional_config={"kv_evict": {"policy": "none"}}, **SMALL_POOL)
    assert ours == stock


# ---- blocks freed per policy ----------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_frees_the_blocks_the_rule_says_and_answers_fluently(llm, tok, prompt_a, policy):
    prompt_len = n_tokens(tok, prompt_a)
    comp = compaction(llm, prompt_len, policy)
    full_blocks = -(-prompt_len // BLOCK)
    snapshots: list[tuple[int, int]] = []
    rid = f"blocks-{policy}"

    def on_step(_step):
        if find_request(llm, rid) is not None:
            snapshots.append((held_blocks(llm, rid), free_blocks(llm)))

    counters = scheduler(llm).kv_counters
    freed_before = counters.freed_blocks.get(policy, 0)
    out = run_steps(llm, [(rid, prompt_a, greedy(kv_policy=policy))], on_step)
    held = [h for h, _ in snapshots]
    # prefix caching is on (vLLM's default): compaction copies into n fresh blocks when the pool has them
    # and then lets all the prompt's full blocks go; without room it works in place
    sched = scheduler(llm)
    room = sched.kv_cache_manager.block_pool.num_gpu_blocks - 1 - full_blocks
    copies = sched.kv_plans.copy_on_compact and comp.kept_blocks <= room
    assert max(held) == full_blocks + (comp.kept_blocks if copies else 0)  # the whole prompt was resident
    i = next(k for k, h in enumerate(held) if k and h < held[k - 1])  # the step that freed
    assert held[i] == comp.kept_blocks + (full_blocks - comp.tail_start_block)
    released = comp.tail_start_block if copies else comp.freed_blocks
    assert held[i - 1] - held[i] == released
    assert snapshots[i][1] - snapshots[i - 1][1] == released  # the pool got them back
    assert counters.freed_blocks[policy] - freed_before == comp.freed_blocks
    if policy in UNIFORM:  # by hand: 256 tokens = 2 blocks kept, tail from block 1947 // 128 = 15
        assert (prompt_len, comp.kept_blocks, comp.freed_blocks) == (1947, 2, 13)
    text = tok.decode(out[rid], skip_special_tokens=True)
    assert_fluent(text)
    assert "Python" in text, text  # the question asks which language the reference text is about


@pytest.mark.parametrize("policy", _declared(layout=KeptLayout.HEAD_LANES))
def test_ada_policies_compact_into_ragged_head_lanes(llm, tok, prompt_a, policy):
    """Every layer's heads keep different numbers of tokens in their own lanes, within the n blocks
    the uniform rule reserves; attention reads them through the lane layout (the worker's LaneStore)."""
    from vllm_kvevict.core.requests import build_policy, request_config, server_config
    from vllm_kvevict.core.state import worker_state
    from vllm_kvevict.paged.lanes import LaneMap, lane_counts
    from vllm_kvevict.paged.layout import layer_lanes

    prompt_len = n_tokens(tok, prompt_a)
    comp = compaction(llm, prompt_len, policy)
    uniform = compaction(llm, prompt_len, policy.removeprefix("ada-"))
    assert comp.kept_blocks == uniform.kept_blocks  # ragged heads cost what the uniform policy costs
    sched = scheduler(llm)
    num_layers, heads = sched.kv_num_layers, 3
    pol = build_policy(request_config(server_config(sched.vllm_config.additional_config), {"kv_policy": policy}))
    rid = f"lanes-{policy}"
    seen: dict[int, object] = {}

    def on_step(_step):
        request = find_request(llm, rid)
        maps = None if request is None else worker_state().lanes.get(request.request_id)
        if maps is not None and not seen:  # [layer, (start, length), head], written by each layer's compaction
            seen.update((layer, LaneMap.build(maps[layer, 1].tolist(), BLOCK)) for layer in range(num_layers))
            assert all(list(lanes.starts) == maps[layer, 0].tolist() for layer, lanes in seen.items())

    out = run_steps(llm, [(rid, prompt_a, greedy(kv_policy=policy))], on_step)
    assert len(seen) == num_layers, "the lane layout was not used"
    ragged = 0
    for layer, lanes in seen.items():
        want = layer_lanes(comp, heads, pol.tokens_per_head(prompt_len, layer, num_layers),
                           pol.max_tokens_per_head(prompt_len, num_layers))
        assert sum(lane_counts(lanes.lengths, BLOCK)) == want <= comp.kept_blocks * heads
        assert lanes.num_blocks <= comp.kept_blocks
        ragged += len(set(lanes.lengths)) > 1
    assert ragged >= num_layers // 3, f"only {ragged} of {num_layers} layers gave heads different budgets"
    run_steps(llm, [(f"{rid}-next", "Hello", greedy(max_tokens=2))])  # vLLM reports finished ids next step
    assert len(worker_state().lanes) == 0  # dropped once the request finished
    text = tok.decode(out[rid], skip_special_tokens=True)
    assert_fluent(text)
    assert "Python" in text, text


def test_decoding_past_the_budget_grows_the_tail(llm, tok, prompt_a):
    prompt_len = n_tokens(tok, prompt_a)
    comp = compaction(llm, prompt_len, "snapkv")
    rid = "long-decode"
    last: list[int] = []

    def on_step(_step):
        request = find_request(llm, rid)
        if request is not None:
            last[:] = [held_blocks(llm, rid), request.num_tokens]

    params = greedy(max_tokens=300)
    params.ignore_eos = True
    out = run_steps(llm, [(rid, prompt_a, params)], on_step)
    assert len(out[rid]) == 300 > BUDGET
    held, num_tokens = last
    # tokens 0..num_tokens-1 hold KV except the newest sampled one
    assert held == comp.kept_blocks + -(-(num_tokens - 1) // BLOCK) - comp.tail_start_block
    assert_fluent(tok.decode(out[rid][:60], skip_special_tokens=True))


# ---- block reuse, preemption, abort, n > 1 ---------------------------------------------------------
def _max_running(llm, requests):
    peak = [0]

    def on_step(_step):
        peak[0] = max(peak[0], len(scheduler(llm).running))

    out = run_steps(llm, requests, on_step)
    return out, peak[0]


@pytest.mark.parametrize("policy", ["snapkv", "ada-snapkv"])
def test_freed_blocks_let_a_second_prompt_run_alongside(llm, prompt_a, prompt_b, policy):
    p = greedy(kv_policy=policy)
    alone_a = run_steps(llm, [("alone-a", prompt_a, p)])["alone-a"]
    alone_b = run_steps(llm, [("alone-b", prompt_b, p)])["alone-b"]
    both, peak = _max_running(llm, [("both-a", prompt_a, p), ("both-b", prompt_b, p)])
    assert peak == 2  # b was admitted while a was still decoding: a's freed blocks held b's prompt
    assert both["both-a"] == alone_a
    assert both["both-b"] == alone_b
    _, peak_full = _max_running(
        llm, [("full-a", prompt_a, greedy(kv_policy="none")), ("full-b", prompt_b, greedy(kv_policy="none"))]
    )
    assert peak_full == 1  # without eviction the pool holds one of them at a time


def test_preemption_under_pool_pressure_gives_the_same_output(llm, tok, prompt_b):
    # a prompt whose last block is full after one generated token: its second token needs a new block
    # while b is being prefilled, and b (the newest) is preempted and recomputed later.
    ctx = 1900
    while n_tokens(tok, long_prompt(tok, ctx)) % BLOCK != BLOCK - 1:
        ctx += 1
    prompt_a = long_prompt(tok, ctx)
    assert n_tokens(tok, prompt_a) == 2047
    alone_a = run_steps(llm, [("p-alone-a", prompt_a, greedy())])["p-alone-a"]
    alone_b = run_steps(llm, [("p-alone-b", prompt_b, greedy())])["p-alone-b"]
    preemptions = [0]

    def on_step(_step):
        for request in scheduler(llm).requests.values():
            preemptions[0] = max(preemptions[0], request.num_preemptions)

    out = run_steps(llm, [("p-a", prompt_a, greedy()), ("p-b", prompt_b, greedy())], on_step)
    assert preemptions[0] >= 1
    assert out["p-a"] == alone_a
    assert out["p-b"] == alone_b


@pytest.mark.parametrize("policy, after", [("snapkv", 10), ("ada-snapkv", 10),
                                           ("vatp", 140)])  # vatp: after a decode-time compaction
def test_preempting_a_compacted_request_recomputes_it_to_the_same_output(llm, prompt_a, policy, after):
    params = greedy(max_tokens=160, kv_policy=policy)
    params.ignore_eos = True
    compactions = scheduler(llm).kv_counters.compactions
    start = compactions.get(policy, 0)
    reference = run_steps(llm, [("r-ref", prompt_a, params)])["r-ref"]
    reference_compactions = compactions[policy] - start
    before = compactions[policy]
    done = [False]

    def on_step(_step):
        request = find_request(llm, "r-pre")
        if done[0] or request is None:
            return
        if len(request.output_token_ids) >= after:  # compacted and decoding: push it back to recompute
            assert scheduler(llm).reset_prefix_cache(reset_running_requests=True)
            done[0] = True

    out = run_steps(llm, [("r-pre", prompt_a, params)], on_step)
    assert done[0]
    assert out["r-pre"] == reference
    redone = 2 if policy == "vatp" else 1  # the prompt's compaction, and vatp's first decode-time one
    assert compactions[policy] - before == reference_compactions + redone


# policies that can re-compact the tail while decoding (a `decode_interval` field)
DECODE_INTERVAL = [n for n in POLICIES if get_spec(n).param("decode_interval") is not None]


def test_every_policy_with_a_decode_interval_keeps_evicting_while_decoding(llm, tok, prompt_a):
    """decode_interval=128 (one block): every 128 tokens of KV past the prompt, the tail goes back into
    the budget, so however long a request decodes it holds at most kept + interval + 1 blocks. All such
    policies run batched; each one's compactions and freed blocks are counted separately."""
    assert {"snapkv", "vatp", "streamingllm"} <= set(DECODE_INTERVAL), DECODE_INTERVAL
    prompt_len = n_tokens(tok, prompt_a)
    held: dict[str, list[int]] = {p: [] for p in DECODE_INTERVAL}

    def on_step(_step):
        for p in DECODE_INTERVAL:
            if find_request(llm, p) is not None:
                held[p].append(held_blocks(llm, p))

    counters = scheduler(llm).kv_counters
    before = {p: (counters.compactions.get(p, 0), counters.freed_blocks.get(p, 0)) for p in DECODE_INTERVAL}
    requests = []
    for p in DECODE_INTERVAL:
        params = greedy(max_tokens=300, kv_policy=p, kv_decode_interval=128)
        params.ignore_eos = True
        requests.append((p, prompt_a, params))
    out = run_steps(llm, requests, on_step)
    points = 1 + (prompt_len + 299 - prompt_len) // 128  # the prompt's, then one per 128 tokens of KV
    for p in DECODE_INTERVAL:
        comp = compaction(llm, prompt_len, p, kv_decode_interval=128)
        assert comp.interval_blocks == 1
        assert counters.compactions[p] - before[p][0] == points == 3, p
        assert counters.freed_blocks[p] - before[p][1] == comp.freed_blocks + (points - 1), p
        after_prompt = held[p][held[p].index(max(held[p])) + 1 :]
        assert max(after_prompt) <= comp.kept_blocks + comp.interval_blocks + 1, (p, held[p])  # bounded
        assert_fluent(tok.decode(out[p][:60], skip_special_tokens=True))
    snap = compaction(llm, prompt_len, "snapkv")  # without an interval the tail grows
    assert held["snapkv"][-1] < snap.kept_blocks + -(-(prompt_len + 299) // BLOCK) - snap.tail_start_block


def test_abort_mid_prefill_returns_every_block_and_query(llm, prompt_a, short_prompt):
    from vllm_kvevict.core.state import worker_state

    engine = llm.llm_engine
    idle = free_blocks(llm)
    # VATP over all queries (H2O) captures queries in every prefill chunk
    engine.add_request("abort-me", prompt_a, greedy(kv_policy="vatp", kv_vatp_mode="accumulate"))
    for _ in range(3):  # 3 of 8 prefill chunks
        engine.step()
    assert free_blocks(llm) < idle
    assert len(worker_state().queries) > 0
    engine.abort_request(["abort-me"])
    out = run_steps(llm, [("after-abort", short_prompt, greedy())])
    assert "Paris" in tok_decode(llm, out["after-abort"])
    assert free_blocks(llm) == idle
    assert len(worker_state().queries) == 0


def tok_decode(llm, ids):
    return llm.get_tokenizer().decode(ids, skip_special_tokens=True)


def test_n_greater_than_one_compacts_every_sample(llm, prompt_a):
    from vllm import SamplingParams

    counters = scheduler(llm).kv_counters
    before = counters.compactions.get("snapkv", 0)
    params = SamplingParams(n=2, temperature=0.7, max_tokens=30)  # (a per-request seed fails on CPU in vLLM 0.32)
    outs = llm.generate([prompt_a], params, use_tqdm=False)
    assert len(outs[0].outputs) == 2
    for sample in outs[0].outputs:
        assert_fluent(sample.text)
    assert counters.compactions["snapkv"] - before == 2  # vLLM prefills each sample as its own request
