"""`vllm-kvevict bench prefix`: a shared-prefix chat workload, with and without the prefix cache.

`documents` conversations side by side, each about one document of `doc_len` tokens of natural text
holding `questions` needles (a key and its 7-digit number). Turn k resends the document, every earlier
question and the model's answers, and asks for the k-th key's number; a conversation's next turn is
submitted when its previous one finishes. Three phases, each in its own process (prefix caching is an
engine setting), on the same pool:

    none + prefix cache       vLLM as shipped
    POLICY, prefix cache off  in-place compaction: what every eviction engine does
    POLICY + prefix cache     copy-on-compact: the prompt's blocks go back to the cache at full fidelity

Per phase: the prefix-cache hit rate (vLLM's per-request cached tokens / prompt tokens), TTFT p50 / p95
over all turns and over follow-up turns (k >= 2), time to the second token and request latency p50 (a
compaction runs before the step after the first token's: it shows there), output tokens/s (wall time,
prefill included), blocks per running request (mean over steps), and accuracy of first and follow-up
turns (the number in the answer) with a Wilson interval. Ratios are to the first phase, measured in the
same run. `repeats` > 1 runs `none` and the policy with the prefix cache again that many times in all
(each pair replaying the first phase's transcript) and reports each ratio's median and range over the
repeats: one run's TTFT ratio moves by +-0.2x with where a compaction lands and how fast the machine is.

The later phases replay the first one's transcript: turn k resends the full cache's answers to turns
< k (the same prompt tokens in every phase), and each request generates exactly as many tokens as the
full cache's did. Every phase then runs the same steps on the same tokens, and a ratio measures what the
policy adds (compactions, recomputed observation windows, cheaper decode), not how differently long
answers happened to line the conversations up (answers that differ in length move a turn's TTFT by
+-0.5 s either way). The accuracy of a later phase's follow-up is thus its answer to a transcript the full
cache wrote.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from vllm_kvevict.bench.capacity import percentile
from vllm_kvevict.eval.engine import check_policies, cpu_defaults, make_llm, policy_args
from vllm_kvevict.eval.scoring import wilson

ANSWER = "The special magic number for {key} mentioned in the provided text is"


@dataclass
class PrefixSpec:
    policy: str = "snapkv"
    budget: int | float = 256
    documents: int = 8
    questions: int = 4
    doc_len: int = 2048
    max_tokens: int = 16
    kv_blocks: int = 192
    seed: int = 0
    repeats: int = 1

    def validate(self) -> None:
        check_policies([self.policy], [self.budget])
        for name, low in (("documents", 1), ("questions", 2), ("doc_len", 256), ("max_tokens", 8),
                          ("repeats", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        need = -(-(self.doc_len + self.questions * (48 + self.max_tokens) + 256) // 128)
        if self.kv_blocks <= need:
            raise ValueError(f"kv_blocks={self.kv_blocks} cannot hold one conversation's last turn ({need} blocks "
                             "of 128 tokens); use more")

    def phases(self) -> list[tuple[str, bool]]:
        return [("none", True), (self.policy, False), (self.policy, True)]

    def repeated_phases(self) -> list[tuple[str, bool]]:
        """What a repeat after the first runs: the two phases with the prefix cache."""
        return [("none", True), (self.policy, True)]


def conversations(tokenizer, spec: PrefixSpec) -> list[dict[str, Any]]:
    """Per document: its text and (key, number) needles, spread evenly through it."""
    from vllm_kvevict.eval.tasks import KEY_NOUNS, KEY_WORDS, natural_sentences

    sentences = natural_sentences()
    out = []
    for d in range(spec.documents):
        rng = random.Random(f"{spec.seed}/prefix/{d}")
        keys = rng.sample([f"{w}-{n}" for w in KEY_WORDS for n in KEY_NOUNS], spec.questions)
        values = [str(rng.randrange(10**6, 10**7)) for _ in keys]
        spots = [int(spec.doc_len * (k + 0.5) / spec.questions) for k in range(spec.questions)]
        text, used, i = [], 0, rng.randrange(len(sentences))
        while used < spec.doc_len:
            while spots and used >= spots[0]:
                k = spec.questions - len(spots)
                text.append(f"One of the special magic numbers for {keys[k]} is: {values[k]}.")
                spots.pop(0)
            text.append(sentences[i % len(sentences)])
            used += len(tokenizer(" " + text[-1], add_special_tokens=False)["input_ids"])
            i += 1
        out.append({"document": " ".join(text), "keys": keys, "values": values})
    return out


def turn_prompt(tokenizer, conv: dict[str, Any], answers: list[str]) -> list[int]:
    """Token ids of turn len(answers): the document, earlier questions and answers, the next question."""
    messages = []
    for k in range(len(answers) + 1):
        question = f"What is the special magic number for {conv['keys'][k]} mentioned in the provided text?"
        messages.append({"role": "user", "content": conv["document"] + "\n\n" + question if k == 0 else question})
        if k < len(answers):
            messages.append({"role": "assistant", "content": ANSWER.format(key=conv["keys"][k]) + answers[k]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + ANSWER.format(key=conv["keys"][len(answers)]), add_special_tokens=False)["input_ids"]


def turn_request(tokenizer, conv: dict[str, Any], own: list[str], max_tokens: int,
                 replay: tuple[dict[str, list[list]], int] | None = None) -> tuple[list[int], int, int]:
    """(prompt ids, max_tokens, min_tokens) of a conversation's next turn (turn len(own)): after the
    phase's own answers, or, replaying (a first phase's transcript, the conversation's index), after that
    transcript's answers and exactly as long as its answer was."""
    if replay is None:
        return turn_prompt(tokenizer, conv, own), max_tokens, 0
    transcript, c = replay
    turn = len(own)
    length = transcript["output_tokens"][c][turn]
    return turn_prompt(tokenizer, conv, transcript["answers"][c][:turn]), length, length


def run_phase(spec: PrefixSpec, model: str, policy: str, prefix_caching: bool,
              reference: dict[str, list[list]] | None = None) -> dict[str, Any]:
    """One phase on a fresh engine in this process; `reference` (a first phase's `transcript`): replay it."""
    from vllm import SamplingParams, TokensPrompt

    cpu_defaults()
    # the last turn, with room; twice that, as a server's max_model_len sits well above its prompts (a prompt
    # within n blocks of it compacts in place and shares nothing, which is not what this measures)
    max_len = 2 * (spec.doc_len + spec.questions * (48 + spec.max_tokens) + 256)
    llm = make_llm(model, max_len, kv_blocks=spec.kv_blocks, enable_prefix_caching=prefix_caching)
    tokenizer = llm.get_tokenizer()
    convs = conversations(tokenizer, spec)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    extra = policy_args(policy, spec.budget)
    answers: list[list[str]] = [[] for _ in convs]
    lengths: list[list[int]] = [[] for _ in convs]  # output tokens per turn
    submitted: dict[str, tuple[int, int, float, int]] = {}  # request -> (conversation, turn, time, prompt tokens)
    rows: list[dict[str, Any]] = []
    per_request_blocks: list[float] = []

    def submit(c: int) -> None:
        turn = len(answers[c])
        ids, max_tokens, min_tokens = turn_request(tokenizer, convs[c], answers[c], spec.max_tokens,
                                                   None if reference is None else (reference, c))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=min_tokens, extra_args=extra)
        name = f"c{c}-t{turn}"  # outputs carry this id (add_request returns vLLM's internal one)
        engine.add_request(name, TokensPrompt(prompt_token_ids=ids), params)
        submitted[name] = (c, turn, time.perf_counter(), len(ids))

    start = time.perf_counter()
    for c in range(len(convs)):
        submit(c)
    first_token: dict[str, float] = {}
    second_token: dict[str, float] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        if sched.running:
            held = sum(sum(1 for b in manager.req_to_blocks.get(r.request_id, ()) if not b.is_null) for r in sched.running)
            per_request_blocks.append(held / len(sched.running))
        for out in outputs:
            if out.outputs[0].token_ids and out.request_id not in first_token:
                first_token[out.request_id] = now
            elif len(out.outputs[0].token_ids) > 1 and out.request_id not in second_token:
                second_token[out.request_id] = now
            if not out.finished:
                continue
            c, turn, t0, n_prompt = submitted[out.request_id]
            text = tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
            rows.append({"conversation": c, "turn": turn, "prompt_tokens": n_prompt, "cached": out.num_cached_tokens,
                         "ttft_s": first_token[out.request_id] - t0,
                         "tt2t_s": second_token.get(out.request_id, now) - t0, "latency_s": now - t0,
                         "output_tokens": len(out.outputs[0].token_ids),
                         "correct": convs[c]["values"][turn] in text})
            answers[c].append(text)
            lengths[c].append(len(out.outputs[0].token_ids))
            if len(answers[c]) < spec.questions:
                submit(c)
    wall = time.perf_counter() - start
    result = summarize(rows, wall, per_request_blocks, policy, prefix_caching)
    result["transcript"] = {"answers": answers, "output_tokens": lengths}
    return result


def summarize(rows: list[dict[str, Any]], wall: float, per_request_blocks: list[float], policy: str,
              prefix_caching: bool) -> dict[str, Any]:
    later = [r for r in rows if r["turn"] > 0]
    first = [r for r in rows if r["turn"] == 0]

    def accuracy(part: list[dict[str, Any]]) -> dict[str, Any]:
        hits = sum(r["correct"] for r in part)
        low, high = wilson(hits, len(part))
        return {"accuracy": hits / max(1, len(part)), "n": len(part), "low": low, "high": high}

    return {
        "policy": policy, "prefix_caching": prefix_caching, "requests": len(rows), "seconds": wall,
        "hit_rate": sum(r["cached"] for r in rows) / sum(r["prompt_tokens"] for r in rows),
        "ttft_p50_s": percentile([r["ttft_s"] for r in rows], 50),
        "ttft_p95_s": percentile([r["ttft_s"] for r in rows], 95),
        "followup_ttft_p50_s": percentile([r["ttft_s"] for r in later], 50),
        "followup_ttft_p95_s": percentile([r["ttft_s"] for r in later], 95),
        "tt2t_p50_s": percentile([r["tt2t_s"] for r in rows], 50),
        "latency_p50_s": percentile([r["latency_s"] for r in rows], 50),
        "output_tok_s": sum(r["output_tokens"] for r in rows) / wall,
        "blocks_per_running_request": sum(per_request_blocks) / max(1, len(per_request_blocks)),
        "first_turn": accuracy(first), "followup": accuracy(later),
    }


def run(spec: PrefixSpec, model: str, progress: bool = True) -> dict[str, Any]:
    """Every phase in its own process (one engine per process), then the side-by-side document."""
    spec.validate()
    phases = _run_phases(spec, model, spec.phases(), None, progress, "")
    reference = phases[0]["transcript"]  # every later phase replays it
    runs = [phases]
    for k in range(2, spec.repeats + 1):
        label = f"repeat {k}/{spec.repeats}: "
        runs.append(_run_phases(spec, model, spec.repeated_phases(), reference, progress, label))
    doc = {"date": _dt.date.today().isoformat(), "spec": asdict(spec), "model": model, "phases": phases}
    if spec.repeats > 1:
        doc["repeats"] = [[_ratios_only(phase) for phase in repeat] for repeat in runs]
        doc["repeat_summary"] = repeat_summary(doc["repeats"])
    return doc


# (ratio, the phase's value it divides by the first phase's, its name in the tables)
TIME_RATIOS = (("ttft_p50_ratio", "ttft_p50_s", "TTFT p50, all turns"),
               ("followup_ttft_p50_ratio", "followup_ttft_p50_s", "TTFT p50, follow-up turns"),
               ("latency_p50_ratio", "latency_p50_s", "latency p50"))
HIT_POINTS = "hit_rate_points_vs_first"
RATIOS = tuple((key, name) for key, _, name in TIME_RATIOS) + ((HIT_POINTS, "hit rate, points vs `none`"),)


def _run_phases(spec: PrefixSpec, model: str, which: list[tuple[str, bool]], reference: dict[str, list[list]] | None,
                progress: bool, label: str) -> list[dict[str, Any]]:
    """The given phases in order, each in a fresh process, with their ratios to the first. Every phase replays
    `reference` when given; otherwise the phases after the first replay the first's transcript."""
    results = []
    for k, (policy, caching) in enumerate(which):
        if progress:
            state = "on" if caching else "off"
            print(f"{label}[{k + 1}/{len(which)}] {policy}, prefix caching {state}", file=sys.stderr, flush=True)
        replay = reference if reference is not None or not results else results[0]["transcript"]
        job = json.dumps({"spec": asdict(spec), "model": model, "policy": policy, "prefix_caching": caching,
                          "reference": replay})
        proc = subprocess.run([sys.executable, "-m", "vllm_kvevict.bench.prefix"], input=job, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"phase {policy} (prefix caching {caching}) failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]
    for r in results:
        for key, value, _ in TIME_RATIOS:
            r[key] = r[value] / base[value]
        r[HIT_POINTS] = 100 * (r["hit_rate"] - base["hit_rate"])
    return results


def _ratios_only(phase: dict[str, Any]) -> dict[str, Any]:
    return {"policy": phase["policy"], "prefix_caching": phase["prefix_caching"], **{k: phase[k] for k, _ in RATIOS}}


def repeat_summary(repeats: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per ratio of the policy with the prefix cache (each repeat's last phase) to `none` (its first): the
    median, the range and every repeat's value, in run order."""
    mine = [phases[-1] for phases in repeats]
    out = {}
    for key, _ in RATIOS:
        values = [p[key] for p in mine]
        out[key] = {"median": percentile(values, 50), "min": min(values), "max": max(values), "each": values}
    return out


def markdown(doc: dict[str, Any]) -> str:
    spec = doc["spec"]
    lines = [f"# Shared-prefix chat: {spec['documents']} documents x {spec['questions']} turns, "
             f"{spec['doc_len']}-token documents, {spec['policy']} at budget {spec['budget']}",
             "", f"Run {doc['date']}, pool {spec['kv_blocks']} blocks; ratios to the first row, same run; the later "
             "rows replay the first row's transcript (the same prompts and output lengths).", "",
             "| phase | hit rate | TTFT p50 / p95 (s) | follow-up TTFT p50 / p95 (s) | 2nd token p50 (s) | latency p50 "
             "(s) | output tok/s | blocks per running request | first-turn accuracy | follow-up accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["phases"]:
        name = f"{r['policy']}, prefix cache {'on' if r['prefix_caching'] else 'off'}"
        acc = [f"{a['accuracy']:.2f} [{a['low']:.2f}, {a['high']:.2f}] (n={a['n']})"
               for a in (r["first_turn"], r["followup"])]
        lines.append(f"| {name} | {r['hit_rate']:.2f} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} "
                     f"({r['ttft_p50_ratio']:.2f}x) | {r['followup_ttft_p50_s']:.2f} / {r['followup_ttft_p95_s']:.2f} "
                     f"({r['followup_ttft_p50_ratio']:.2f}x) | {r['tt2t_p50_s']:.2f} | {r['latency_p50_s']:.2f} "
                     f"({r['latency_p50_ratio']:.2f}x) | {r['output_tok_s']:.1f} | "
                     f"{r['blocks_per_running_request']:.1f} | {acc[0]} | {acc[1]} |")
    summary = doc.get("repeat_summary")
    if summary:
        lines += ["", f"Repeated {len(doc['repeats'])} times (the repeats after the first run only the two phases "
                  "with the prefix cache, replaying the same transcript). Ratios of the policy with the prefix cache "
                  "to `none`, each within its repeat:", "",
                  "| ratio | median | range | each repeat |", "|---|---|---|---|"]
        for key, name in RATIOS:
            ratio = summary[key]
            fmt = (lambda v: f"{v:+.1f}") if key == HIT_POINTS else (lambda v: f"{v:.2f}x")
            lines.append(f"| {name} | {fmt(ratio['median'])} | {fmt(ratio['min'])} .. {fmt(ratio['max'])} | "
                         f"{', '.join(fmt(v) for v in ratio['each'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one phase: JSON job on stdin, the phase's JSON on the last stdout line
    job = json.loads(sys.stdin.read())
    result = run_phase(PrefixSpec(**job["spec"]), job["model"], job["policy"], job["prefix_caching"],
                       job.get("reference"))
    print(json.dumps(result))
