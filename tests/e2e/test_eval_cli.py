"""`vllm-kvevict eval --quick` and `bench capacity --quick` end to end (console script, real vLLM,
the default model), and the teacher forcing that the ppl task relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.engine import model_path

pytestmark = pytest.mark.e2e

EXE = str(Path(sys.executable).parent / "vllm-kvevict")
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
EVAL_KEYS = {"policy", "budget", "context", "task", "accuracy", "n", "ci_low", "ci_high"}
CAPACITY_KEYS = {"policy", "budget", "blocks_per_request", "peak_running", "output_tok_s", "ttft_p50_s", "ttft_p95_s",
                 "itl_p50_s", "itl_p95_s", "ratio_vs_none"}
PNG = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str], out: Path) -> None:
    proc = subprocess.run([EXE, *args, "--out", str(out), "--no-progress"], capture_output=True, text=True,
                          env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_eval_quick_writes_the_contract(tmp_path):
    _run(["eval", "--quick", "--policies", "snapkv", "--tasks", "passkey,niah,agreement,ppl"], tmp_path)
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["model"] == model_path()
    cells = {(r["policy"], r["budget"], r["context"], r["task"]): r for r in doc["records"]}
    expected = {("none", None, 512, t) for t in ("passkey", "niah", "ppl")}
    expected |= {("snapkv", 128, 512, t) for t in ("passkey", "niah", "agreement", "ppl")}
    assert set(cells) == expected
    for rec in doc["records"]:
        assert EVAL_KEYS <= set(rec)
        assert rec["n"] == 2 and 0.0 <= rec["ci_low"] <= rec["accuracy"] <= rec["ci_high"] <= 1.0
    assert cells[("none", None, 512, "ppl")]["perplexity"] > 1.0
    assert {(r["task"], r["depth"]) for r in doc["by_depth"]} == {("passkey", 0.5), ("niah", 0.5)}
    md = (tmp_path / "eval.md").read_text()
    assert "**needle (natural text)**, 512 tokens" in md and "| snapkv |" in md
    for png in ("accuracy_vs_budget_512.png", "needle_depth.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def test_bench_capacity_quick_shows_eviction_buying_concurrency(tmp_path):
    """--quick with 64 output tokens and --decode-interval 32: every policy also runs with its tail
    re-compacted every 32 tokens, and every row reports its greedy agreement with none's outputs."""
    _run(["bench", "capacity", "--quick", "--max-tokens", "64", "--decode-interval", "32"], tmp_path)
    doc = json.loads((tmp_path / "capacity.json").read_text())
    assert doc["kv_blocks"] == 40 and doc["model"] == model_path()
    recs = {(r["policy"], r["decode_interval"]): r for r in doc["records"]}
    assert list(recs) == [("none", 0), ("snapkv", 0), ("streamingllm", 0), ("snapkv", 32), ("streamingllm", 32)]
    for rec in recs.values():
        assert CAPACITY_KEYS <= set(rec) and {"peak_running", "output_tok_s"} <= set(rec["ratio_vs_none"])
        assert rec["ttft_p50_s"] <= rec["ttft_p95_s"] and rec["itl_p50_s"] <= rec["itl_p95_s"]
        assert rec["lone_ttft_s"] > 0 and rec["timeline"][-1][1:] == [0, 0, 0]  # every request done, pool free
        assert max(step[1] for step in rec["timeline"]) == rec["peak_running"]
        assert max(step[3] for step in rec["timeline"]) <= doc["kv_blocks"]
        assert 0.0 <= rec["agreement"] <= 1.0 and "tokens" not in rec
    none = recs[("none", 0)]
    # 512+64 tokens = 18 blocks of 32: the 39 usable blocks hold two full requests at a time
    assert none["peak_running"] == 2 and none["blocks_per_request"] == 18 and none["agreement"] == 1.0
    for policy in ("snapkv", "streamingllm"):
        rec, bounded = recs[(policy, 0)], recs[(policy, 32)]
        assert rec["blocks_per_request"] <= 4  # budget 64 = 2 kept blocks, + the tail's decode block(s)
        assert bounded["blocks_per_request"] <= 2 + 1 + 1  # kept + interval + the block being written
        assert rec["peak_running"] > none["peak_running"]
        assert rec["ratio_vs_none"]["peak_running"] == rec["peak_running"] / none["peak_running"]
        assert bounded["compaction_s"] > 0 and rec["compaction_s"] > 0  # worker time, from the scheduler's counters
        # re-compaction starts once 32 tokens are generated: the first ~32 tokens match the run without it
        assert 0.4 <= bounded["agreement_vs_no_interval"] <= 1.0 and "agreement_vs_no_interval" not in rec
    assert none["compaction_s"] == 0
    assert (tmp_path / "capacity.png").read_bytes()[:8] == PNG
    assert (tmp_path / "capacity_timeline.png").read_bytes()[:8] == PNG
    md = (tmp_path / "capacity.md").read_text()
    assert "| none | full | 18.0 | 2 |" in md and "| snapkv + interval 32 | 64 |" in md


def test_forced_decoding_scores_like_prompt_logprobs():
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("forcing_main.py"))],
                          input=json.dumps({"model": model_path()}), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["forced_ids"] == got["cont"] and len(got["cont"]) == 24
    assert got["forced_lp"] == pytest.approx(got["prompt_lp"], abs=2e-3)
    assert sum(got["forced_lp"]) < -1.0  # real scores, not the processor's forced 0.0


def test_bench_prefix_quick_reads_shared_documents_from_the_cache_with_eviction(tmp_path):
    """--quick: 2 conversations x 2 turns over 512-token documents, three engines. The follow-up turn of
    `none` and of snapkv with prefix caching reads its document from the cache (vLLM's count), snapkv
    without it reads nothing, and copy-on-compact holds no more blocks per request than in-place. The later
    phases replay the first one's transcript: every request generates as many tokens as the full cache's.
    --repeats 2 runs the two prefix-cache phases once more and summarises each ratio over both runs."""
    _run(["bench", "prefix", "--quick", "--repeats", "2"], tmp_path)
    doc = json.loads((tmp_path / "prefix.json").read_text())
    none, in_place, copied = doc["phases"]
    assert [(p["policy"], p["prefix_caching"]) for p in doc["phases"]] == [
        ("none", True), ("snapkv", False), ("snapkv", True)]
    assert all(p["requests"] == 4 and p["followup"]["n"] == 2 for p in doc["phases"])
    assert none["hit_rate"] > 0.3 and in_place["hit_rate"] == 0.0
    assert copied["hit_rate"] >= none["hit_rate"] - 0.1
    assert copied["blocks_per_running_request"] <= in_place["blocks_per_running_request"] + 0.5
    assert copied["blocks_per_running_request"] < none["blocks_per_running_request"]
    assert all(0 < p["ttft_p50_s"] <= p["tt2t_p50_s"] <= p["latency_p50_s"] for p in doc["phases"])
    lengths = none["transcript"]["output_tokens"]
    assert [len(turns) for turns in lengths] == [2, 2]
    assert in_place["transcript"]["output_tokens"] == copied["transcript"]["output_tokens"] == lengths
    assert [[(p["policy"], p["prefix_caching"]) for p in run] for run in doc["repeats"]] == [
        [("none", True), ("snapkv", False), ("snapkv", True)], [("none", True), ("snapkv", True)]]
    ttft = doc["repeat_summary"]["ttft_p50_ratio"]
    assert ttft["each"] == [run[-1]["ttft_p50_ratio"] for run in doc["repeats"]]
    assert ttft["each"][0] == copied["ttft_p50_ratio"]
    assert ttft["median"] == pytest.approx(sum(ttft["each"]) / 2)  # of two
    hits = doc["repeat_summary"]["hit_rate_points_vs_first"]["each"]
    assert hits[1] == hits[0]  # the same prompts: the same cache hits
    text = (tmp_path / "prefix.md").read_text()
    assert "| snapkv, prefix cache on |" in text and "Repeated 2 times" in text
