"""The load test's parts that need no server: the request mix, the bench invocation, the spec's
checks, and a real Prometheus process (Debian's, from the venv) scraping a tiny exporter."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from vllm_kvevict.bench import loadtest
from vllm_kvevict.bench.prom import Prometheus, find_prometheus


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tests.e2e.engine import model_path

    return AutoTokenizer.from_pretrained(model_path())


def test_rows_are_a_seeded_mix_within_the_lengths(tokenizer):
    spec = loadtest.LoadSpec(requests=30, context=(300, 900), max_tokens=(5, 9), seed=3)
    rows = loadtest.make_rows(tokenizer, spec)
    assert rows == loadtest.make_rows(tokenizer, spec)  # deterministic
    assert rows != loadtest.make_rows(tokenizer, loadtest.LoadSpec(requests=30, context=(300, 900), seed=4))
    kinds = {r["kind"] for r in rows}
    assert kinds == set(loadtest.KINDS)
    for r in rows:
        assert 5 <= r["output_tokens"] <= 9
        if r["kind"] == "qa":
            assert 300 <= r["prompt_tokens"] <= 900 and "special magic number" in r["prompt"]
        elif r["kind"] == "chat":
            assert r["prompt_tokens"] < 300
        assert abs(len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) - r["prompt_tokens"]) <= 3


def test_mix_weights_are_honoured(tokenizer):
    rows = loadtest.make_rows(tokenizer, loadtest.LoadSpec(requests=12, context=(100, 200), mix=(0, 0, 1)))
    assert {r["kind"] for r in rows} == {"chat"}


def test_bench_command_overrides_the_policy_per_request(tmp_path):
    spec = loadtest.LoadSpec(budget=256, ramp=(1, 3), max_concurrency=5)
    cmd = loadtest.bench_command(spec, "snapkv", tmp_path / "d.jsonl", tmp_path, "smol", "/m")
    body = json.loads(cmd[cmd.index("--extra-body") + 1])
    assert body["vllm_xargs"] == {"kv_policy": "snapkv", "kv_budget": 256}
    cmd = loadtest.bench_command(spec, "none", tmp_path / "d.jsonl", tmp_path, "smol", "/m")
    other = json.loads(cmd[cmd.index("--extra-body") + 1])
    assert other["vllm_xargs"] == {"kv_policy": "none"}
    assert other["cache_salt"] != body["cache_salt"]  # no phase hits another's prompts in the prefix cache
    assert cmd[1:3] == ["bench", "serve"] and "--ignore-eos" in cmd
    assert cmd[cmd.index("--ramp-up-end-rps") + 1] == "3" and cmd[cmd.index("--max-concurrency") + 1] == "5"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(policies=("none", "bogus")), "bogus"), (dict(policies=("none", "none")), "distinct"),
    (dict(ramp=(3, 1)), "ramp"), (dict(context=(10, 20)), "context"), (dict(requests=0), "requests"),
    (dict(mix=(0, 0, 0)), "mix"), (dict(max_tokens=(0, 4)), "max_tokens")])
def test_bad_spec_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        loadtest.LoadSpec(**kwargs).check()


def test_cli_rejects_a_bad_policy_before_any_request(capsys):
    from vllm_kvevict.cli.main import main

    assert main(["loadtest", "--policies", "none,nope", "--url", "http://127.0.0.1:9"]) == 2
    assert "nope" in capsys.readouterr().err


class _Exporter(http.server.BaseHTTPRequestHandler):
    count = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).count += 1
        body = f"# HELP demo_total A demo counter.\n# TYPE demo_total counter\ndemo_total {self.count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_real_prometheus_scrapes_and_answers_range_queries():
    assert Path(find_prometheus()).exists()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Prometheus(f"127.0.0.1:{server.server_address[1]}", interval_s=0.5) as prom:
            prom.wait_scraped()
            start = time.time()
            time.sleep(3)
            series = prom.query_range("demo_total", start - 1, time.time(), 0.5)
            assert len(series) == 1 and series[0]["labels"]["job"] == "vllm"
            values = [v for _, v in series[0]["points"]]
            assert len(values) >= 3 and values == sorted(values) and values[-1] > values[0]
            rate = prom.query_range("rate(demo_total[2s])", start, time.time(), 0.5)
            assert rate and all(v > 0 for _, v in rate[0]["points"])
            with pytest.raises(RuntimeError, match="failed"):
                prom.query("rate(demo_total[")  # a PromQL syntax error is an error, not an empty chart
    finally:
        server.shutdown()
