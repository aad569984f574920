"""`vllm serve --kv-policy snapkv --kv-budget 256` over HTTP: the OpenAI API, overrides, /metrics.

A real `vllm serve` process (the console script, not a python -m workaround) with the default model.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.engine import long_prompt, model_path
from vllm_kvevict.bench.prom import free_port

pytestmark = pytest.mark.e2e

VLLM = str(Path(sys.executable).with_name("vllm"))
NAME = "smol"
SERVE_ENV = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
SERVE_ENV.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it: engine in its own process
BASE_ARGS = ["--served-model-name", NAME, "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
             "--block-size", "128", "--host", "127.0.0.1"]


@contextlib.contextmanager
def serving(log: Path, policy_args: list[str]):
    """A `vllm serve` of the default model with `policy_args`, up and healthy; its URL."""
    port = free_port()
    args = [VLLM, "serve", model_path(), *BASE_ARGS, "--port", str(port), *policy_args]
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=SERVE_ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("serve") / "serve.log", ["--kv-policy", "snapkv", "--kv-budget", "256"]) as url:
        yield url


@pytest.fixture(scope="module")
def long_text():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    return long_prompt(tok, 1900)


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post_stream(url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(url + path, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    events, done = [], False
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 200
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
    assert done, "stream did not end with [DONE]"
    return events


def metrics(url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm_kvevict:"):
                out[(sample.name, sample.labels.get("policy", ""))] = sample.value
    return out


def wait_for(url: str, key: tuple[str, str], at_least: float, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = metrics(url)
        if current.get(key, 0.0) >= at_least or time.monotonic() > deadline:
            return current
        time.sleep(0.5)


COMPACTIONS = ("vllm_kvevict:compactions_total", "snapkv")


def test_completion_is_compacted_and_counted(server, long_text):
    before = metrics(server)
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 30,
                                                    "temperature": 0})
    assert status == 200, body
    assert "Python" in body["choices"][0]["text"]
    after = wait_for(server, COMPACTIONS, before.get(COMPACTIONS, 0) + 1)
    assert after[COMPACTIONS] == before.get(COMPACTIONS, 0) + 1
    key = ("vllm_kvevict:evicted_tokens_total", "snapkv")
    assert after[key] - before.get(key, 0) == 1947 - 256 - (1947 - 15 * 128)  # 13 blocks of 128
    key = ("vllm_kvevict:freed_blocks_total", "snapkv")
    assert after[key] - before.get(key, 0) == 13
    key = ("vllm_kvevict:kept_ratio_count", "snapkv")
    assert after[key] - before.get(key, 0) == 1


def test_metric_names_types_and_help_after_traffic(server, long_text):
    from prometheus_client.parser import text_string_to_metric_families

    def families():
        with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
            return {f.name: f for f in text_string_to_metric_families(r.read().decode()) if f.name.startswith("vllm_kvevict:")}

    before = metrics(server)
    status, _ = post(server, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 5, "temperature": 0})
    assert status == 200
    key = ("vllm_kvevict:compaction_seconds_count", "snapkv")
    after = wait_for(server, key, before.get(key, 0) + 1)
    assert after[key] == before.get(key, 0) + 1  # one compaction timed, in the worker
    assert 0 < after[("vllm_kvevict:compaction_seconds_sum", "snapkv")] < 60
    found = families()
    expected = {"vllm_kvevict:evicted_tokens": "counter", "vllm_kvevict:freed_blocks": "counter",
                "vllm_kvevict:compactions": "counter", "vllm_kvevict:kept_ratio": "histogram",
                "vllm_kvevict:compaction_seconds": "histogram", "vllm_kvevict:kv_cache_tokens": "gauge",
                "vllm_kvevict:policy_info": "gauge", "vllm_kvevict:selection_cache_hits": "counter",
                "vllm_kvevict:selection_cache_misses": "counter", "vllm_kvevict:selected_tokens": "histogram"}
    for name, kind in expected.items():
        assert name in found and found[name].type == kind, (name, found.get(name))
        assert found[name].documentation.strip(), name
    info = [s for s in found["vllm_kvevict:policy_info"].samples]
    assert [(s.labels, s.value) for s in info] == [({"policy": "snapkv", "budget": "256"}, 1.0)]
    kinds = {s.labels["kind"]: s.value for s in found["vllm_kvevict:kv_cache_tokens"].samples
             if s.labels["policy"] == "snapkv"}
    assert set(kinds) == {"logical", "physical"} and kinds["physical"] <= kinds["logical"]


def test_streaming_completion_and_chat(server, long_text):
    events = post_stream(server, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 20,
                                                     "temperature": 0})
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert "Python" in text
    question = long_text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    chat = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 20, "temperature": 0}
    status, body = post(server, "/v1/chat/completions", chat)
    assert status == 200, body
    assert "Python" in body["choices"][0]["message"]["content"]
    events = post_stream(server, "/v1/chat/completions", chat)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert streamed == body["choices"][0]["message"]["content"]


def test_ada_snapkv_override_is_compacted_and_answers(server, long_text):
    """Over HTTP, an ada-snapkv request (the ragged head-lane path, tested in-process in
    test_vllm_eviction.py) answers and frees exactly the blocks snapkv frees at the same budget."""
    key = ("vllm_kvevict:compactions_total", "ada-snapkv")
    before = metrics(server)
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 30,
                                                    "temperature": 0, "vllm_xargs": {"kv_policy": "ada-snapkv"}})
    assert status == 200, body
    assert "Python" in body["choices"][0]["text"]
    after = wait_for(server, key, before.get(key, 0) + 1)
    assert after[key] == before.get(key, 0) + 1
    freed = ("vllm_kvevict:freed_blocks_total", "ada-snapkv")
    assert after[freed] - before.get(freed, 0) == 13


def test_override_none_is_not_compacted(server, long_text):
    before = metrics(server)
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 5,
                                                    "temperature": 0, "vllm_xargs": {"kv_policy": "none"}})
    assert status == 200, body
    # a compacted request right after it shows the counters are live, and that only it was counted
    status, _ = post(server, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 5, "temperature": 0})
    assert status == 200
    after = wait_for(server, COMPACTIONS, before.get(COMPACTIONS, 0) + 1)
    assert after[COMPACTIONS] == before.get(COMPACTIONS, 0) + 1


@pytest.mark.parametrize(
    "xargs, field",
    [({"kv_budget": 0}, "kv_budget"), ({"kv_policy": "bogus"}, "kv_policy"), ({"kv_policy": "tokenselect", "kv_budget": "3/2"}, "kv_budget"),
     ({"kv_sink_tokens": -1}, "sink_tokens")],
)
def test_bad_override_is_a_400_naming_the_field(server, xargs, field):
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": "Hello", "max_tokens": 3,
                                                    "vllm_xargs": xargs})
    assert status == 400, body
    message = json.dumps(body)
    assert field in message, message
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": "The capital of France is",
                                                    "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"], body  # the server is unaffected


@pytest.mark.parametrize("flags, needle", [(["--kv-budget", "0"], "budget=0"),
                                           (["--kv-policy", "bogus"], "bogus"),
                                           (["--kv-policy", "locret"], "locret' needs --enforce-eager")])
def test_bad_server_flag_refuses_to_start(flags, needle):
    base = [a for a in BASE_ARGS if a != "--enforce-eager"] if "locret" in flags else BASE_ARGS
    args = [VLLM, "serve", model_path(), *base, "--port", str(free_port()), *flags]
    if "--kv-policy" not in flags:
        args += ["--kv-policy", "snapkv"]
    proc = subprocess.run(args, capture_output=True, text=True, env=SERVE_ENV, timeout=300)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-3000:]


def test_tokenselect_server_answers_and_counts_selections(tmp_path, long_text):
    """`vllm serve --kv-policy tokenselect`: selection runs in the worker process, its counts reach
    /metrics through the scheduler; a short prompt selects nothing."""
    flags = ["--kv-policy", "tokenselect", "--kv-budget", "64", "--kv-n-init", "16", "--kv-n-local", "64"]
    with serving(tmp_path / "serve.log", flags) as url:
        status, body = post(url, "/v1/completions", {"model": NAME, "prompt": "The capital of France is",
                                                     "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"], body
        assert metrics(url).get(("vllm_kvevict:selection_cache_misses_total", "tokenselect"), 0) == 0
        status, body = post(url, "/v1/completions", {"model": NAME, "prompt": long_text, "max_tokens": 20,
                                                     "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert body["choices"][0]["text"].strip() and body["usage"]["completion_tokens"] == 20
        key = ("vllm_kvevict:selection_cache_misses_total", "tokenselect")
        steps = ("vllm_kvevict:selected_tokens_count", "tokenselect")
        after = wait_for(url, steps, 19)  # the last steps' stats may trail the response
        assert after[steps] >= 19  # every decode step after the prefill's first token selected
        assert after[key] >= 30  # every layer computed a selection at least once
        hits = after.get(("vllm_kvevict:selection_cache_hits_total", "tokenselect"), 0)
        assert 16 + 64 <= after[("vllm_kvevict:selected_tokens_sum", "tokenselect")] / after[
            ("vllm_kvevict:selected_tokens_count", "tokenselect")] <= 16 + 64 + 64 + 1024
        assert hits + after[key] >= 19 * 30


def test_quick_loadtest_report_from_real_prometheus(server, tmp_path):
    """`vllm-kvevict loadtest --quick` against the live server: vllm bench serve drives a mixed,
    streamed, ramping load once with `none` and once with `snapkv` (per-request overrides); Debian's
    prometheus scrapes /metrics; every chart's series comes back from its query API non-empty."""
    out = tmp_path / "load"
    cli = str(Path(sys.executable).with_name("vllm-kvevict"))
    proc = subprocess.run([cli, "loadtest", "--quick", "--url", server, "--policies", "none,snapkv",
                           "--budget", "256", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert [p["policy"] for p in report["phases"]] == ["none", "snapkv"]
    assert sum(report["mix"].values()) == 8 and report["mix"]["qa"] > 0
    for phase in report["phases"]:
        client = phase["client"]
        assert client["completed"] == 8, phase
        assert client["p95_ttft_ms"] >= client["p50_ttft_ms"] > 0 and client["p50_itl_ms"] > 0
        assert 0 < phase["prometheus"]["kv_usage_max"] <= 1
        assert phase["prometheus"]["generation_tokens"] >= client["total_output_tokens"] * 0.9
    none, snap = report["phases"]
    # the same rows, EOS ignored: both phases generated the same tokens; only snapkv evicted
    assert none["client"]["total_output_tokens"] == snap["client"]["total_output_tokens"]
    assert none["prometheus"]["evicted_tokens"] == 0 and snap["prometheus"]["evicted_tokens"] > 0
    assert snap["prometheus"]["freed_blocks"] > 0
    for chart, lines in report["series"].items():
        for line in lines:
            assert line["points"], (chart, line["legend"], line["query"])
    peak = max(v for _, v in report["series"]["evictions"][0]["points"])
    assert peak > 0  # evicted tokens/s rose during the snapkv phase
    assert sorted(report["charts"]) == ["evictions.png", "kv_usage.png", "latency.png", "overview.png",
                                        "summary.png", "throughput.png"]
    for name in report["charts"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    table = (out / "report.md").read_text()
    assert "| none |" in table and "| snapkv |" in table
