"""`vllm-kvevict loadtest`: drive a running OpenAI endpoint, watch it with a real Prometheus, report.

The load tool is vLLM's own `vllm bench serve` (it ships with the pinned vLLM, so nothing new to
install; it speaks the OpenAI chat endpoint with streaming and measures TTFT/ITL exactly as vLLM
defines them; it has a request-rate ramp and a concurrency cap). We give it a realistic mix as a
custom dataset (the same rows, in the same order, for every policy):

    qa       long-document QA: a needle question over natural text of `context` tokens
    summary  summarise a natural-text document of a quarter to a half of `context`
    chat     a short question about one to three sentences

with output lengths drawn per row from `max_tokens` (EOS ignored, so every policy does the same work).

Each policy is one *phase* against the same server: its requests carry the per-request override
`vllm_xargs: {kv_policy, kv_budget}` and a `cache_salt` of its own, so that no phase reads another's
prompts from the prefix cache. The offered load ramps linearly from
`ramp[0]` to `ramp[1]` requests/s, at most `max_concurrency` in flight.

Meanwhile `prometheus` (Debian's, started here on loopback) scrapes the server's /metrics every
`scrape_interval_s`. After the last phase every chart's series is read back through Prometheus's
query API over the whole run, and the report is written:

    report.json          spec, per-phase client numbers (vllm bench) and Prometheus numbers, every series
    bench-<policy>.json  vllm bench serve's own result file, per request
    throughput.png  latency.png  kv_usage.png  evictions.png   time series, phases shaded
    summary.png          per-phase TTFT / ITL percentiles (client side), side by side
    overview.png         all of the above on one page
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from vllm_kvevict.bench.loadtest_report import PERCENTILES, plot
from vllm_kvevict.bench.prom import Prometheus

KINDS = ("qa", "summary", "chat")

#: Chart name -> [(legend, PromQL)]. `$w` is the rate window. Every query here must return a
#: non-empty series after a phase with traffic (the quick test checks it).
SERIES: dict[str, list[tuple[str, str]]] = {
    "throughput": [
        ("generation tok/s", "sum(rate(vllm:generation_tokens_total[$w]))"),
        ("prompt tok/s", "sum(rate(vllm:prompt_tokens_total[$w]))"),
    ],
    "latency": [
        ("TTFT p50", "histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[$w])))"),
        ("TTFT p95", "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[$w])))"),
        ("ITL p50", "histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[$w])))"),
        ("ITL p95", "histogram_quantile(0.95, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[$w])))"),
    ],
    "kv_usage": [
        ("KV cache usage %", "100 * max(vllm:kv_cache_usage_perc)"),
        ("requests running", "sum(vllm:num_requests_running)"),
        ("requests waiting", "sum(vllm:num_requests_waiting)"),
    ],
    "evictions": [
        ("evicted tokens/s", "sum(rate(vllm_kvevict:evicted_tokens_total[$w]))"),
        ("freed blocks/s", "sum(rate(vllm_kvevict:freed_blocks_total[$w]))"),
        ("compactions/s", "sum(rate(vllm_kvevict:compactions_total[$w]))"),
    ],
}


@dataclass
class LoadSpec:
    url: str = "http://127.0.0.1:8000"
    policies: Sequence[str] = ("none", "ada-snapkv")
    budget: int | float | None = 1024
    requests: int = 40  # per phase
    ramp: tuple[int, int] = (1, 4)  # requests/s, linear ramp over the phase
    max_concurrency: int = 16
    context: tuple[int, int] = (1024, 6144)  # prompt tokens of a long-document request (min, max)
    mix: tuple[float, float, float] = (0.5, 0.2, 0.3)  # fractions of qa, summary, chat
    max_tokens: tuple[int, int] = (32, 256)
    scrape_interval_s: float = 1.0
    rate_window_s: int = 10
    pause_s: float = 5.0  # idle time between phases, so the charts separate them
    seed: int = 0
    model: str | None = None  # served model name (default: the server's first)
    tokenizer: str | None = None  # default: the served model's path (/v1/models "root")

    def check(self) -> None:
        from vllm_kvevict.policies.registry import POLICIES

        for policy in self.policies:
            if policy not in POLICIES:
                raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        if len(set(self.policies)) != len(self.policies) or not self.policies:
            raise ValueError(f"policies must be distinct and non-empty, got {list(self.policies)}")
        if self.requests < 1:
            raise ValueError(f"requests={self.requests} must be at least 1")
        if not 0 < self.ramp[0] <= self.ramp[1]:
            raise ValueError(f"ramp={self.ramp} must be 0 < start <= end requests/s")
        if not 64 <= self.context[0] <= self.context[1]:
            raise ValueError(f"context={self.context} must be 64 <= min <= max tokens")
        if not 1 <= self.max_tokens[0] <= self.max_tokens[1]:
            raise ValueError(f"max_tokens={self.max_tokens} must be 1 <= min <= max")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix={self.mix} must be three non-negative fractions (qa, summary, chat)")


#: `--quick`: what `make test` runs (a few minutes on 2 CPU cores with the default model).
QUICK = dict(requests=8, ramp=(1, 4), max_concurrency=4, context=(384, 1536), max_tokens=(12, 32),
             rate_window_s=6, pause_s=3.0)


# ---- the dataset ---------------------------------------------------------------------------------
def make_rows(tokenizer, spec: LoadSpec) -> list[dict]:
    """`spec.requests` rows {"prompt", "output_tokens", "kind", "prompt_tokens"}; seeded, in order."""
    from vllm_kvevict.eval.tasks import PromptBuilder, make_sample, natural_sentences

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    builder = PromptBuilder(encode, None)  # plain content: the chat endpoint applies the template
    rng = random.Random(f"loadtest/{spec.seed}")
    natural = natural_sentences()
    lo, hi = spec.context
    rows = []
    for i in range(spec.requests):
        kind = rng.choices(KINDS, weights=spec.mix)[0]
        if kind == "qa":
            sample = make_sample(builder, "niah", rng.randint(lo, hi), round(rng.random(), 2), i, spec.seed)
            ids = list(sample.prompt_ids)
        elif kind == "summary":
            n = rng.randint(max(64, lo // 4), max(64, hi // 2))
            ids = list(make_sample(builder, "agreement", n, None, i, spec.seed).prompt_ids)
        else:
            start = rng.randrange(len(natural))
            text = " ".join(natural[start:start + rng.randint(1, 3)])
            ids = encode(f"{text}\n\n{rng.choice(CHAT_ASKS)}")
        rows.append({"prompt": tokenizer.decode(ids), "output_tokens": rng.randint(*spec.max_tokens),
                     "kind": kind, "prompt_tokens": len(ids)})
    return rows


CHAT_ASKS = ("Explain this in simple words.", "What does this mean for a Python programmer?",
             "Give a short example.", "Is this true? Answer briefly.", "Rephrase this as a question.")


# ---- the server ----------------------------------------------------------------------------------
def served_model(url: str) -> tuple[str, str]:
    """(served name, model path) of the endpoint's first model."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as r:
            data = json.loads(r.read())["data"]
    except OSError as exc:
        raise RuntimeError(f"no OpenAI endpoint at {url!r} ({exc}); start one first, e.g. `make serve`") from exc
    if not data:
        raise RuntimeError(f"{url} serves no model")
    return data[0]["id"], data[0].get("root") or data[0]["id"]


def bench_command(spec: LoadSpec, policy: str, dataset: Path, out: Path, model: str, tokenizer: str) -> list[str]:
    """The `vllm bench serve` invocation of one phase."""
    override: dict[str, Any] = {"kv_policy": policy}
    if policy != "none" and spec.budget is not None:
        override["kv_budget"] = spec.budget
    return [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", spec.url.rstrip("/"),
        "--model", model, "--tokenizer", tokenizer,
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--num-prompts", str(spec.requests),
        "--disable-shuffle", "--ignore-eos", "--temperature", "0", "--seed", str(spec.seed),
        "--ramp-up-strategy", "linear",
        "--ramp-up-start-rps", str(spec.ramp[0]), "--ramp-up-end-rps", str(spec.ramp[1]),
        "--max-concurrency", str(spec.max_concurrency), "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        # a salt per phase: no phase reads another's prompts from the prefix cache (each may hit its own)
        "--extra-body", json.dumps({"vllm_xargs": override, "cache_salt": f"kvevict-loadtest-{policy}"}),
        "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", f"bench-{policy}.json",
        "--label", policy,
    ]


def run_phase(cmd: list[str], log: Path, result: Path) -> dict:
    with open(log, "w") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); its log {log}:\n"
                           f"{log.read_text()[-3000:]}")
    data = json.loads(result.read_text())
    errors = [e for e in data.get("errors", []) if e]
    if data.get("failed") or errors:
        raise RuntimeError(f"{data.get('failed', len(errors))} of {len(data.get('errors', []))} requests failed "
                           f"(label {data.get('label')!r}); first error: {errors[0] if errors else '?'}")
    return data


CLIENT_KEYS = ("completed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
               "max_concurrent_requests", "total_input_tokens", "total_output_tokens")


def client_summary(data: dict) -> dict:
    out = {k: data.get(k) for k in CLIENT_KEYS}
    for metric in ("ttft", "itl", "tpot", "e2el"):
        for p in PERCENTILES:
            out[f"p{p}_{metric}_ms"] = data.get(f"p{p}_{metric}_ms")
        out[f"mean_{metric}_ms"] = data.get(f"mean_{metric}_ms")
    return out


# ---- Prometheus numbers --------------------------------------------------------------------------
def phase_numbers(prom: Prometheus, start: float, end: float) -> dict:
    """What Prometheus recorded for one phase: KV usage peak/mean, token and eviction counts, server
    TTFT p95. Counts are a counter's value at the end minus at the start (a series born inside the
    phase, like a policy's first eviction, counts from 0; `increase()` would drop its first sample)."""
    span = max(1, int(round(end - start)))

    def scalar(expr: str, at: float) -> float | None:
        result = prom.query(expr, at=at)
        return float(result[0]["value"][1]) if result else None

    def counted(metric: str) -> float:
        return (scalar(f"sum({metric})", end) or 0.0) - (scalar(f"sum({metric})", start) or 0.0)

    return {
        "kv_usage_max": scalar(f"max(max_over_time(vllm:kv_cache_usage_perc[{span}s]))", end),
        "kv_usage_mean": scalar(f"avg(avg_over_time(vllm:kv_cache_usage_perc[{span}s]))", end),
        "generation_tokens": counted("vllm:generation_tokens_total"),
        "prompt_tokens": counted("vllm:prompt_tokens_total"),
        "evicted_tokens": counted("vllm_kvevict:evicted_tokens_total"),
        "freed_blocks": counted("vllm_kvevict:freed_blocks_total"),
        "compactions": counted("vllm_kvevict:compactions_total"),
        "ttft_p95_s": scalar("histogram_quantile(0.95, sum by (le) "
                             f"(increase(vllm:time_to_first_token_seconds_bucket[{span}s])))", end),
    }


def read_series(prom: Prometheus, start: float, end: float, spec: LoadSpec) -> dict[str, list[dict]]:
    step = spec.scrape_interval_s
    out: dict[str, list[dict]] = {}
    for chart, queries in SERIES.items():
        out[chart] = []
        for legend, expr in queries:
            expr = expr.replace("$w", f"{spec.rate_window_s}s")
            points = [p for s in prom.query_range(expr, start, end, step) for p in s["points"]]
            out[chart].append({"legend": legend, "query": expr, "points": sorted(points)})
    return out


# ---- the run -------------------------------------------------------------------------------------
def run(spec: LoadSpec, out: Path, log: Callable[[str], None] = print) -> dict:
    """One load test; writes the report under `out` and returns it."""
    spec.check()
    out.mkdir(parents=True, exist_ok=True)
    model, root = served_model(spec.url)
    model = spec.model or model
    tokenizer_path = spec.tokenizer or root
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    rows = make_rows(tokenizer, spec)
    dataset = out / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    log(f"loadtest: {spec.requests} requests per policy ({', '.join(f'{v} {k}' for k, v in mix.items())}), "
        f"prompts {min(r['prompt_tokens'] for r in rows)}-{max(r['prompt_tokens'] for r in rows)} tokens, "
        f"ramp {spec.ramp[0]}->{spec.ramp[1]} req/s, at most {spec.max_concurrency} in flight")

    target = spec.url.split("://", 1)[-1].rstrip("/").split("/", 1)[0]
    phases = []
    with Prometheus(target, spec.scrape_interval_s) as prom:
        prom.wait_scraped()
        t0 = time.time()
        time.sleep(spec.pause_s)
        for k, policy in enumerate(spec.policies):
            log(f"loadtest: phase {k + 1}/{len(spec.policies)}: {policy}")
            start = time.time()
            data = run_phase(bench_command(spec, policy, dataset, out, model, tokenizer_path),
                             out / f"bench-{policy}.log", out / f"bench-{policy}.json")
            end = time.time()
            # traffic began `duration` before the tool exited (its start-up, ~20 s, is not load)
            start = max(start, end - float(data["duration"]) - 1.0)
            time.sleep(spec.pause_s + 2 * spec.scrape_interval_s)  # the last scrapes of the phase land
            phases.append({"policy": policy, "start": start, "end": end, "client": client_summary(data),
                           "prometheus": phase_numbers(prom, start - spec.scrape_interval_s, end + spec.scrape_interval_s)})
            c = phases[-1]["client"]
            log(f"loadtest:   {c['completed']} requests in {c['duration']:.1f} s, {c['output_throughput']:.1f} "
                f"output tok/s, TTFT p95 {c['p95_ttft_ms']:.0f} ms, ITL p95 {c['p95_itl_ms']:.0f} ms")
        t1 = time.time()
        series = read_series(prom, t0, t1, spec)
    report = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "tool": "vllm bench serve (vLLM's own load generator), Prometheus query_range for the series",
        "spec": asdict(spec), "model": model, "mix": mix, "start": t0, "end": t1,
        "phases": phases, "series": series,
    }
    report["charts"] = plot(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


# ---- charts --------------------------------------------------------------------------------------
