"""Task generators and scoring of `vllm-kvevict eval` (the default model's tokenizer, no vLLM)."""

from __future__ import annotations

import math

import pytest

from vllm_kvevict.eval import scoring
from vllm_kvevict.eval.tasks import MAX_SENTENCE_TOKENS, NEEDLE_TASKS, TASKS, make_sample, make_samples


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from vllm_kvevict.models.smollm2 import prepare_default_model

    return AutoTokenizer.from_pretrained(str(prepare_default_model(progress=False)))


@pytest.fixture(scope="module")
def builder(tokenizer):
    from vllm_kvevict.eval.tasks import hf_builder

    return hf_builder(tokenizer)


def _find(haystack: list[int], needle: list[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if haystack[i : i + n] == needle]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context", [700, 2048, 4096])
def test_prompt_length_is_exact_and_a_natural_tokenization(builder, tokenizer, task, context):
    s = make_sample(builder, task, context, 0.4, 0, seed=3)
    assert len(s.prompt_ids) == context
    # the ids are sent as they are; re-tokenizing their text gives (within 1%) the same count
    text = tokenizer.decode(list(s.prompt_ids))
    assert abs(len(tokenizer(text, add_special_tokens=False)["input_ids"]) - context) <= 0.01 * context
    if task == "ppl":
        assert len(s.continuation_ids) == 64 and s.max_tokens == 64
    elif task != "agreement":
        assert text.startswith("<|im_start|>system") and "<|im_start|>assistant" in text[-200:]


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needles_present_once_at_the_requested_depth(builder, tokenizer, task, depth):
    context = 2048
    s = make_sample(builder, task, context, depth, 1, seed=0)
    ids = list(s.prompt_ids)
    text = tokenizer.decode(ids)
    assert s.needles and len(s.needles) == len(s.needle_depths)
    for needle in s.needles:
        assert text.count(needle) == 1, needle
        assert len(_find(ids, builder.sentence(needle))) == 1
    # the first needle is the one asked about, within one sentence of the requested depth
    tolerance = (MAX_SENTENCE_TOKENS + 1) / (context * 0.8)
    assert abs(s.needle_depths[0] - depth) <= tolerance, (s.needle_depths, depth)
    # every answer is in the prompt (inside a needle) and nowhere else
    for answer in s.answers:
        in_needles = sum(n.count(answer) for n in s.needles)
        assert in_needles >= 1 and text.count(answer) == in_needles


def test_answers_are_checkable(builder):
    s = make_sample(builder, "niah_multivalue", 1024, 0.5, 0, seed=0)
    assert len(s.answers) == 4 and len(set(s.answers)) == 4
    full = "The numbers are " + ", ".join(s.answers) + "."
    assert scoring.contains_all(full, s.answers) == 1.0
    assert scoring.contains_all(full.replace(s.answers[2], "0"), s.answers) == 0.0
    p = make_sample(builder, "passkey", 1024, 0.5, 0, seed=0)
    assert scoring.contains_all(f" {p.answers[0]}.", p.answers) == 1.0
    assert scoring.contains_all(f" {p.answers[0]}7.", p.answers) == 0.0  # inside a longer number
    vt = make_sample(builder, "vt", 1024, 0.2, 0, seed=0)
    assert [n.split()[1] for n in vt.needles] == list(vt.answers)  # VAR <name> = ..., in chain order
    assert vt.needle_depths == tuple(sorted(vt.needle_depths))


def test_same_seed_same_prompts_other_seed_other_prompts(builder):
    args = (["passkey", "niah", "niah_multikey", "vt", "agreement", "ppl"], [512, 1024], [0.2, 0.8], 2)
    a = make_samples(builder, *args, seed=7)
    b = make_samples(builder, *args, seed=7)
    c = make_samples(builder, *args, seed=8)
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b]
    assert [s.answers for s in a] == [s.answers for s in b]
    differ = sum(x.prompt_ids != y.prompt_ids for x, y in zip(a, c))
    assert differ == len(a)
    # needle tasks sweep depths; the others take as many samples, without a depth
    assert len(a) == 6 * 2 * 2 * 2
    assert {s.depth for s in a if s.task in ("agreement", "ppl")} == {None}


def test_bad_task_and_too_short_context(builder):
    with pytest.raises(ValueError, match="task='nope'"):
        make_sample(builder, "nope", 1024, 0.5, 0, 0)
    with pytest.raises(ValueError, match="context=90 is too short"):
        make_sample(builder, "niah_multivalue", 90, 0.5, 0, 0)


def test_scoring_functions_on_hand_made_outputs():
    assert scoring.contains_all("VAR ABCDE and QWERT", ["ABCDE", "QWERT"]) == 1.0
    assert scoring.contains_all("XABCDE and QWERT", ["ABCDE", "QWERT"]) == 0.0
    with pytest.raises(ValueError):
        scoring.contains_all("x", [])
    assert scoring.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4], 4) == 0.5
    assert scoring.prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4, 5], 2) == 1.0
    assert scoring.prefix_agreement([1, 2], [1], 8) == 0.5  # reference shorter than n: its own length
    assert scoring.perplexity([math.log(0.5)] * 5) == pytest.approx(2.0)
    lo, hi = scoring.wilson(0, 4)
    assert lo == 0.0 and hi == pytest.approx(0.4899, abs=1e-4)
    lo, hi = scoring.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    assert scoring.bootstrap(values, seed=1) == scoring.bootstrap(values, seed=1)
    lo, hi = scoring.bootstrap(values, seed=1)
    assert lo < sum(values) / 5 < hi and 0.1 <= lo and hi <= 0.9
    s = scoring.summarize([1.0, 0.0, 1.0, 1.0])
    assert s["accuracy"] == 0.75 and s["n"] == 4 and (s["ci_low"], s["ci_high"]) == scoring.wilson(3, 4)
    s = scoring.summarize([0.5, 0.25])
    assert (s["ci_low"], s["ci_high"]) == scoring.bootstrap([0.5, 0.25])
