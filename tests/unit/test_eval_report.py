"""Aggregation, reports and argument checking of `eval` / `bench capacity` (no engine)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_kvevict.bench.capacity import CapacitySpec, percentile
from vllm_kvevict.cli.main import main
from vllm_kvevict.eval import report
from vllm_kvevict.eval.runner import EvalSpec, Job, forced_logprobs, merge, plan_jobs, score
from vllm_kvevict.eval.tasks import Sample

PNG = b"\x89PNG\r\n\x1a\n"


def _sample(task, depth=0.5, index=0, answers=(), cont=()):
    return Sample(task, 1024, depth, index, (1, 2, 3), answers=answers, continuation_ids=cont)


def _out(text="", ids=(), logprobs=None):
    return SimpleNamespace(text=text, token_ids=list(ids), logprobs=logprobs)


def _lp(logprob, rank):
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_score_aggregates_per_cell_and_depth():
    spec = EvalSpec(policies=["snapkv"], budgets=[128], contexts=[1024], agreement_tokens=4)
    pk0, pk1 = _sample("passkey", 0.1, 0, ("12345",)), _sample("passkey", 0.9, 0, ("54321",))
    ag = _sample("agreement", None)
    pp = _sample("ppl", None, cont=(7, 8))
    results = [
        (Job(pk0, "none", None), _out(" 12345.")),
        (Job(pk1, "none", None), _out(" 54321")),
        (Job(ag, "none", None), _out(ids=[1, 2, 3, 4])),
        (Job(pp, "none", None), _out(ids=[7, 8], logprobs=[{7: _lp(math.log(0.5), 1)}, {8: _lp(math.log(0.25), 2)}])),
        (Job(pk0, "snapkv", 128), _out(" 12345")),
        (Job(pk1, "snapkv", 128), _out(" 99999")),
        (Job(ag, "snapkv", 128), _out(ids=[1, 2, 9, 4])),
        (Job(pp, "snapkv", 128), _out(ids=[7, 8], logprobs=[{7: _lp(math.log(0.25), 3)}, {8: _lp(math.log(0.25), 1)}])),
    ]
    doc = score(spec, results)
    rec = {(r["policy"], r["task"]): r for r in doc["records"]}
    assert rec[("none", "passkey")]["accuracy"] == 1.0 and rec[("none", "passkey")]["n"] == 2
    assert rec[("snapkv", "passkey")]["accuracy"] == 0.5 and rec[("snapkv", "passkey")]["budget"] == 128
    assert ("none", "agreement") not in rec  # the reference is not scored against itself
    assert rec[("snapkv", "agreement")]["accuracy"] == 0.5
    assert rec[("none", "ppl")]["perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.25)) / 2))
    assert rec[("none", "ppl")]["accuracy"] == 0.5 and rec[("snapkv", "ppl")]["perplexity"] == pytest.approx(4.0)
    for r in doc["records"]:
        assert {"policy", "budget", "context", "task", "accuracy", "n", "ci_low", "ci_high"} <= set(r)
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    depth = {(r["policy"], r["depth"]): r["accuracy"] for r in doc["by_depth"]}
    assert depth == {("none", 0.1): 1.0, ("none", 0.9): 1.0, ("snapkv", 0.1): 1.0, ("snapkv", 0.9): 0.0}


def test_forced_logprobs_refuses_an_unforced_output():
    with pytest.raises(RuntimeError, match="teacher forcing failed"):
        forced_logprobs(_out(ids=[7, 9], logprobs=[{7: _lp(0.0, 1)}, {9: _lp(0.0, 1)}]), (7, 8))


def test_plan_jobs_runs_none_everywhere_and_policies_where_asked():
    samples = [Sample(t, c, 0.5, 0, (1,)) for c in (1024, 2048) for t in ("niah", "agreement")]
    spec = EvalSpec(policies=["snapkv", "vatp"], budgets=[128, 256], policy_contexts=[2048])
    jobs = plan_jobs(spec, [s for s in samples if s.task == "niah"])
    assert sum(j.policy == "none" for j in jobs) == 2
    # agreement's full-cache reference runs only where policies are compared with it
    assert [(j.sample.task, j.sample.context) for j in plan_jobs(spec, samples) if j.policy == "none"] == [
        ("niah", 1024), ("niah", 2048), ("agreement", 2048)]
    assert {(j.policy, j.budget, j.sample.context) for j in jobs if j.policy != "none"} == {
        ("snapkv", 128, 2048), ("snapkv", 256, 2048), ("vatp", 128, 2048), ("vatp", 256, 2048)}


def _doc(policies, accuracy, date, **grid):
    spec = {"budgets": [128], "contexts": [1024], "tasks": ["niah"], "depths": [0.5], "samples": 2, "seed": 0,
            "agreement_tokens": 32, "policy_contexts": None, "policies": policies, **grid}
    records = [{"policy": p, "budget": None if p == "none" else 128, "context": 1024, "task": "niah",
                "accuracy": accuracy[p], "n": 2, "ci_low": 0.0, "ci_high": 1.0} for p in ["none", *policies]]
    by_depth = [{**r, "depth": 0.5} for r in records]
    return {"model": "m", "date": date, "seconds": 1.0, "requests": 2 * len(records), "spec": spec,
            "records": records, "by_depth": by_depth}


def test_an_update_replaces_the_rerun_policies_records_and_keeps_the_others():
    old = _doc(["snapkv", "vatp"], {"none": 1.0, "snapkv": 0.5, "vatp": 0.0}, "day 1")
    new = _doc(["vatp"], {"none": 1.0, "vatp": 1.0}, "day 2")
    doc = merge(old, new)
    acc = {r["policy"]: r["accuracy"] for r in doc["records"]}
    assert acc == {"none": 1.0, "snapkv": 0.5, "vatp": 1.0} and len(doc["by_depth"]) == 3
    assert [r["policy"] for r in doc["records"]] == ["none", "snapkv", "vatp"]  # the report's rows stay in order
    assert doc["spec"]["policies"] == ["snapkv", "vatp"] and doc["date"] == "day 1"
    assert doc["updates"] == [{"policies": ["none", "vatp"], "date": "day 2", "seconds": 1.0, "requests": 4}]
    assert "Re-run day 2 (`eval --update`, 4 requests, 1.0 s): none, vatp." in report.eval_markdown(doc)
    with pytest.raises(ValueError, match=r"samples=4 differs from the existing result's 2"):
        merge(old, _doc(["vatp"], {"none": 1.0, "vatp": 1.0}, "day 2", samples=4))


def test_markdown_and_plots(tmp_path):
    recs = []
    for policy, budget, acc in [("none", None, 0.9), ("snapkv", 128, 0.5), ("snapkv", 256, 0.75)]:
        recs.append({"policy": policy, "budget": budget, "context": 1024, "task": "niah", "accuracy": acc,
                     "n": 4, "ci_low": acc - 0.2, "ci_high": min(1.0, acc + 0.1)})
    by_depth = [{"policy": "snapkv", "budget": 128, "context": 1024, "task": "niah", "depth": d, "accuracy": a, "n": 2}
                for d, a in [(0.1, 1.0), (0.9, 0.0)]]
    doc = {"model": "/x/SmolLM2", "date": "today", "records": recs, "by_depth": by_depth}
    md = report.eval_markdown(doc)
    assert "| policy | full | 128 | 256 |" in md
    assert "| snapkv |  | 0.50 [0.30, 0.60] n=4 | 0.75 [0.55, 0.85] n=4 |" in md
    paths = report.eval_plots(doc, tmp_path)
    assert {p.name for p in paths} == {"accuracy_vs_budget_1024.png", "needle_depth.png"}
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    cap = {"model": "m", "kv_blocks": 40, "block_size": 32, "requests": 2, "prompt_len": 512, "max_tokens": 8, "records": [
        {"policy": p, "budget": b, "blocks_per_request": k, "peak_running": r, "output_tok_s": t, "ttft_p50_s": 1.0,
         "ttft_p95_s": 2.0, "itl_p50_s": 0.1, "itl_p95_s": 0.2, "lone_ttft_s": 0.5 * r, "compaction_s": r - 2,
         "timeline": [[0.0, 0, r, 0], [1.0, r, 0, k * r], [2.0, 0, 0, 0]],
         "ratio_vs_none": {"peak_running": r / 2, "output_tok_s": t / 10, "blocks_per_request": k / 17,
                           "lone_ttft_s": r / 2, "itl_p50_s": 1.0}}
        for p, b, k, r, t in [("none", None, 17, 2, 10.0), ("snapkv", 64, 3, 6, 15.0)]]}
    cap["records"][1].update(agreement=0.5)
    md = report.capacity_markdown(cap)
    assert "| snapkv | 64 | 3.0 | 6 | 15.0 | 1.00 / 2.00 | 0.100 / 0.200 | 3.00 | 1.50 | 1.00 | 3.00 (x3.00) | 4.00 | 0.50 |" in md
    assert "interval" not in md
    cap["records"].append(dict(cap["records"][1], decode_interval=256, agreement=0.25, agreement_vs_no_interval=0.75))
    md = report.capacity_markdown(cap)
    assert "| snapkv + interval 256 | 64 | 3.0 |" in md and "| 0.25 (0.75 vs no interval) |" in md
    assert "re-compacted every N" in md
    del cap["records"][2]
    assert report.capacity_plot(cap, tmp_path).read_bytes()[:8] == PNG
    assert report.capacity_timeline_plot(cap, tmp_path).read_bytes()[:8] == PNG
    for rec in cap["records"]:
        del rec["timeline"]
    assert report.capacity_timeline_plot(cap, tmp_path) is None


def test_percentile():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("argv,message", [
    (["eval", "--budgets", "128,abc"], "budget='abc' is invalid"),
    (["eval", "--budgets", "1.5"], "write a token count as an integer"),
    (["eval", "--policies", "snapkv,h2o"], "policy 'h2o' is unknown; choose from none, ada-pyramidkv"),
    (["eval", "--tasks", "niah,summ"], "task 'summ' is not one of"),
    (["eval", "--depths", "1.5"], "depth 1.5 must be in [0, 1]"),
    (["eval", "--context", "100"], "context 100 is too short"),
    (["eval", "--model", "/nonexistent"], "--model '/nonexistent' is not a Hugging Face directory"),
    (["eval", "--update", "--out", "/nonexistent"], "--update re-runs --policies into an existing result"),
    (["eval", "--update", "--policies", "vatp", "--out", "/nonexistent"], "'/nonexistent/eval.json' does not exist"),
    (["bench", "capacity", "--block-size", "48"], "block_size=48 must be a multiple of 32"),
    (["bench", "capacity", "--kv-blocks", "10"], "kv_blocks=10 cannot hold one request"),
    (["bench", "capacity", "--decode-interval", "-1"], "decode_interval=-1 must be >= 0"),
    (["bench", "capacity", "--requests", "0"], "requests=0 must be >= 1"),
    (["bench", "capacity", "--policies", "nope"], "policy 'nope' is unknown"),
    (["bench", "prefix", "--policy", "nope"], "policy 'nope' is unknown"),
    (["bench", "prefix", "--questions", "1"], "questions=1 must be >= 2"),
    (["bench", "prefix", "--kv-blocks", "12"], "kv_blocks=12 cannot hold one conversation's last turn"),
    (["bench", "prefix", "--repeats", "0"], "repeats=0 must be >= 1"),
])
def test_bad_arguments_fail_fast_with_a_clear_message(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse type errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_update_of_another_grid_is_refused_before_the_model_runs(tmp_path, capsys):
    """`eval --update` checks the stored grid first: a mismatch costs a second, not the whole run."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # enough for --model; nothing loads it when the check fails
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps(_doc(["vatp"], {"none": 1.0, "vatp": 1.0}, "day 1")))
    argv = ["eval", "--update", "--policies", "vatp", "--budgets", "128", "--context", "1024", "--tasks", "niah",
            "--depths", "0.5", "--samples", "2", "--model", str(model), "--out", str(out)]
    assert main(argv) == 2
    assert f"--update: model {str(model)!r} differs from the existing result's 'm'" in capsys.readouterr().err
    (out / "eval.json").write_text(json.dumps({**_doc(["vatp"], {"none": 1.0, "vatp": 1.0}, "day 1"),
                                               "model": str(model)}))
    assert main([*argv[:-4], "--samples", "3", *argv[-4:]]) == 2
    assert "samples=3 differs from the existing result's 2" in capsys.readouterr().err


def test_capacity_spec_defaults_are_the_issue_setting():
    spec = CapacitySpec()
    spec.validate()
    assert (spec.prompt_len, spec.budget) == (2048, 256)  # budget 1/8 of a 2K prompt


def test_needle_summary_pools_needle_tasks_with_an_interval_and_a_ratio_to_full():
    recs = [{"policy": "none", "budget": None, "context": c, "task": t, "accuracy": a, "n": 4}
            for c, t, a in [(1024, "niah", 1.0), (1024, "niah_multikey", 0.5), (2048, "niah", 0.75)]]
    recs += [{"policy": "snapkv", "budget": 0.125, "context": 1024, "task": t, "accuracy": a, "n": 4}
             for t, a in [("niah", 0.5), ("niah_multikey", 0.25)]]
    recs.append({"policy": "snapkv", "budget": 0.125, "context": 1024, "task": "agreement", "accuracy": 0.9, "n": 4})
    rows = {(r["policy"], r["budget"]): r for r in report.needle_summary({"records": recs})}
    snap = rows[("snapkv", 0.125)]
    assert snap["n"] == 8 and snap["accuracy"] == pytest.approx(3 / 8)  # agreement is not a needle task
    assert snap["of_full"] == pytest.approx((3 / 8) / (6 / 8))  # full cache on the same (task, context) cells
    assert snap["ci_low"] < 3 / 8 < snap["ci_high"]
    assert rows[("none", None)]["n"] == 12
    md = report.needle_summary_markdown({"records": recs})
    assert "| policy | full | 1/8 |" in md and "0.38 [" in md and "n=8, 0.50 of full" in md
    assert report._fmt_budget(0.25) == "1/4" and report._fmt_budget(0.3) == "0.3" and report._fmt_budget(256) == "256"


class _CharTokenizer:
    """A chat template that joins the messages; one token per character."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "|".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_a_replayed_turn_sends_the_first_phases_transcript_and_answers_as_long():
    """bench prefix: later phases resend the full cache's answers (the same prompt tokens in every phase)
    and generate exactly as many tokens as it did, so every phase runs the same steps."""
    from vllm_kvevict.bench.prefix import turn_request, turn_prompt

    tok = _CharTokenizer()
    conv = {"document": "doc", "keys": ["a-b", "c-d", "e-f"], "values": ["1", "2", "3"]}
    transcript = {"answers": [["x"], [" 1234567.", " 7654321"]], "output_tokens": [[3], [5, 9]]}
    own = [" 1234567 and more"]  # this phase's own answer to turn 0 differs from the full cache's
    ids, max_tokens, min_tokens = turn_request(tok, conv, own, 16, (transcript, 1))
    assert ids == turn_prompt(tok, conv, [" 1234567."]) != turn_prompt(tok, conv, own)
    assert (max_tokens, min_tokens) == (9, 9)  # conversation 1's turn 1 answer was 9 tokens long
    assert turn_request(tok, conv, own, 16) == (turn_prompt(tok, conv, own), 16, 0)  # the first phase: free


def test_repeated_prefix_runs_report_each_ratios_median_and_range():
    """bench prefix --repeats: the policy-with-cache ratios of every repeat, their median and range, in the
    document and its table; the in-place phase (first repeat only) does not enter them."""
    from vllm_kvevict.bench.prefix import RATIOS, markdown, repeat_summary

    def phase(policy, caching, ttft, follow):
        return {"policy": policy, "prefix_caching": caching, "ttft_p50_ratio": ttft, "followup_ttft_p50_ratio": follow,
                "latency_p50_ratio": 1.0, "hit_rate_points_vs_first": -0.3}

    repeats = [[phase("none", True, 1.0, 1.0), phase("snapkv", False, 11.0, 9.0), phase("snapkv", True, 1.37, 1.23)],
               [phase("none", True, 1.0, 1.0), phase("snapkv", True, 1.13, 0.99)],
               [phase("none", True, 1.0, 1.0), phase("snapkv", True, 1.31, 0.97)]]
    summary = repeat_summary(repeats)
    assert set(summary) == {key for key, _ in RATIOS}
    assert summary["ttft_p50_ratio"] == {"median": 1.31, "min": 1.13, "max": 1.37, "each": [1.37, 1.13, 1.31]}
    assert summary["followup_ttft_p50_ratio"]["median"] == 0.99
    one = {"policy": "none", "prefix_caching": True, "hit_rate": 0.72, "ttft_p50_s": 0.3, "ttft_p95_s": 1.0,
           "ttft_p50_ratio": 1.0, "followup_ttft_p50_s": 0.3, "followup_ttft_p95_s": 0.5,
           "followup_ttft_p50_ratio": 1.0,
           "tt2t_p50_s": 0.6, "latency_p50_s": 2.0, "latency_p50_ratio": 1.0, "output_tok_s": 14.0,
           "blocks_per_running_request": 18.6, "first_turn": {"accuracy": 0.0, "low": 0.0, "high": 0.3, "n": 8},
           "followup": {"accuracy": 0.4, "low": 0.2, "high": 0.6, "n": 24}}
    doc = {"date": "2026-12-03", "spec": {"documents": 8, "questions": 4, "doc_len": 2048, "policy": "snapkv",
                                          "budget": 256, "kv_blocks": 192},
           "phases": [one], "repeats": repeats, "repeat_summary": summary}
    text = markdown(doc)
    assert "Repeated 3 times" in text
    assert "| TTFT p50, all turns | 1.31x | 1.13x .. 1.37x | 1.37x, 1.13x, 1.31x |" in text
    assert "| hit rate, points vs `none` | -0.3 | -0.3 .. -0.3 |" in text
    del doc["repeat_summary"]
    assert "Repeated" not in markdown(doc)  # a single run: the table alone
