"""`vllm-kvevict loadtest`: load a running endpoint with vLLM's own `vllm bench serve`, one phase per
policy, watched by a real Prometheus; JSON + PNG report (see vllm_kvevict.bench.loadtest)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from vllm_kvevict.cli.eval_cmd import _budget, _list, _pair


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest", help="load-test a running endpoint, none vs a policy, with Prometheus and a report",
        description="Drives a running OpenAI endpoint (start one with `make serve`: it must run an eviction "
                    "policy, so per-request overrides work both ways) with vLLM's `vllm bench serve`: a mix of "
                    "long-document QA, summaries and chat, streamed, at a linearly ramping request rate, once per "
                    "policy (per-request override). Debian's prometheus scrapes the endpoint on loopback; the "
                    "report (report.json, PNG charts) is read back from Prometheus's query API.")
    p.add_argument("--url", default=None, help="the endpoint (default http://127.0.0.1:8000)")
    p.add_argument("--policies", type=_list(str), default=None, help="one phase each, in order (default none,ada-snapkv)")
    p.add_argument("--budget", type=_budget, default=None, help="kv_budget of the eviction phases (default 1024)")
    p.add_argument("--requests", type=int, default=None, help="requests per phase (default 40)")
    p.add_argument("--ramp", type=_pair(int), default=None, help="START,END requests/s, linear (default 1,4)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default 16)")
    p.add_argument("--context", type=_pair(int), default=None, help="MIN,MAX prompt tokens of long-document requests "
                                                                     "(default 1024,6144)")
    p.add_argument("--max-tokens", type=_pair(int), default=None, help="MIN,MAX output tokens (default 32,256)")
    p.add_argument("--mix", type=_list(float), default=None, help="fractions of qa,summary,chat (default 0.5,0.2,0.3)")
    p.add_argument("--scrape-interval", type=float, default=None, dest="scrape_interval_s",
                   help="Prometheus scrape interval, seconds (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default=None, help="served model name (default: the endpoint's first)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the served model's path)")
    p.add_argument("--quick", action="store_true", help="8 short requests per phase (what `make test` runs)")
    p.add_argument("--out", type=Path, default=Path("kvevict-loadtest"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_kvevict.bench import loadtest, loadtest_report

    kwargs = dict(loadtest.QUICK) if args.quick else {}
    for f in fields(loadtest.LoadSpec):
        value = getattr(args, f.name, None)
        if value is not None:
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    spec = loadtest.LoadSpec(**kwargs)
    report = loadtest.run(spec, args.out)
    table = loadtest_report.markdown(report)
    (args.out / "report.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out / 'report.json'}, {args.out / 'report.md'}, "
          + ", ".join(str(args.out / c) for c in report["charts"]))
    return 0
