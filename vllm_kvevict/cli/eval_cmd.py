"""`vllm-kvevict eval` and `vllm-kvevict bench capacity`: quality and capacity through vLLM.

Both write JSON (the stable contract in `vllm_kvevict.eval.runner` / `vllm_kvevict.bench.capacity`),
a Markdown table and PNG plots into `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


POLICIES_HELP = ("comma list (default: every policy the engine can serve); NAME:FIELD=VALUE[:FIELD=VALUE] "
                 "runs a variant with preset fields changed, e.g. snapkv:kernel_size=9 (an ablation row)")


def _list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _pair(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """MIN,MAX (or one value for both) as a tuple of two `kind`s."""
    def parse(text: str) -> tuple:
        try:
            parts = _list(kind)(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX ({exc})") from None
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX")
        return tuple(parts)

    return parse


def _budget(text: str):
    from vllm_kvevict.policies.budget import parse_budget

    return parse_budget(text)


def register(sub: argparse._SubParsersAction) -> None:
    from vllm_kvevict.eval.tasks import TASKS

    ev = sub.add_parser("eval", help="quality under compression (passkey, needles, agreement, perplexity) through vLLM",
                        description="Runs every policy x budget x context x task on the default model in one vLLM "
                                    "engine; the full cache (none) is always included.")
    ev.add_argument("--policies", type=_list(str), default=None, help=POLICIES_HELP)
    ev.add_argument("--budgets", type=_list(_budget), default=None,
                    help="comma list of tokens per KV head (256) or prompt ratios (0.125); default 128,256,512")
    ev.add_argument("--context", type=_list(int), default=None, help="prompt lengths in tokens (default 1024,2048,4096)")
    ev.add_argument("--policy-context", type=_list(int), default=None,
                    help="run the policies only at these prompt lengths (the full cache runs at every --context)")
    ev.add_argument("--tasks", type=_list(str), default=None, help=f"comma list of {', '.join(TASKS)} (default: all)")
    ev.add_argument("--depths", type=_list(float), default=None, help="needle depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)")
    ev.add_argument("--samples", type=int, default=None, help="samples per task x context x depth (default 2)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--kv-gib", type=float, default=2.0, help="KV pool on CPU (VLLM_CPU_KVCACHE_SPACE), GiB")
    ev.add_argument("--quick", action="store_true", help="a small grid that finishes in a few minutes on 2 CPU cores")
    ev.add_argument("--model", default=None, help="Hugging Face directory (default: the prepared default model)")
    ev.add_argument("--out", type=Path, default=Path("kvevict-results"), help="output directory (default kvevict-results)")
    ev.add_argument("--update", action="store_true",
                    help="re-run --policies (and the full cache) on the grid of --out's existing eval.json and replace "
                         "their records there, keeping the other policies' (the grid flags must match)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=run_eval)

    bench = sub.add_parser("bench", help="benchmarks through vLLM")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    cap = bsub.add_parser("capacity", help="concurrency and throughput under a small fixed KV pool, none vs policies",
                          description="Submits --requests prompts at once to an engine with a --kv-blocks pool, once "
                                      "per policy (none first), and reports blocks per request, peak running "
                                      "requests, tokens/s, TTFT and ITL, with ratios to none.")
    cap.add_argument("--policies", type=_list(str), default=None, help=POLICIES_HELP)
    cap.add_argument("--budget", type=_budget, default=None, help="tokens per KV head or prompt ratio (default 256)")
    cap.add_argument("--kv-blocks", type=int, default=None, help="KV pool size in blocks (default 48)")
    cap.add_argument("--block-size", type=int, default=None, help="tokens per block, a multiple of 32 on CPU (default 128)")
    cap.add_argument("--requests", type=int, default=None, help="concurrent requests (default 12)")
    cap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 2048)")
    cap.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 128)")
    cap.add_argument("--decode-interval", type=int, default=None,
                     help="also run every policy that offers it with kv_decode_interval N (default 0: off)")
    cap.add_argument("--quick", action="store_true", help="a small run (512-token prompts, 32-token blocks) of about a minute")
    cap.add_argument("--model", default=None)
    cap.add_argument("--out", type=Path, default=Path("kvevict-results"))
    cap.add_argument("--no-progress", action="store_true")
    cap.set_defaults(func=run_capacity)

    pre = bsub.add_parser("prefix", help="shared-prefix chat turns: none + prefix cache vs a policy without and with it",
                          description="Conversations about shared documents (a needle per turn): prefix-cache hit "
                                      "rate, TTFT, tokens/s, blocks per request and follow-up accuracy for none with "
                                      "prefix caching, the policy without it (in-place) and with it (copy-on-compact).")
    pre.add_argument("--policy", default=None, help="the eviction policy (default snapkv)")
    pre.add_argument("--budget", type=_budget, default=None, help="tokens per KV head or prompt ratio (default 256)")
    pre.add_argument("--documents", type=int, default=None, help="conversations, one document each (default 8)")
    pre.add_argument("--questions", type=int, default=None, help="turns per conversation, a needle each (default 4)")
    pre.add_argument("--doc-len", type=int, default=None, help="document tokens (default 2048)")
    pre.add_argument("--kv-blocks", type=int, default=None, help="KV pool size in 128-token blocks (default 192)")
    pre.add_argument("--repeats", type=int, default=None,
                     help="run none and the policy with the prefix cache this many times in all, and report each "
                          "ratio's median and range (default 1)")
    pre.add_argument("--quick", action="store_true", help="2 conversations x 2 turns over 512-token documents")
    pre.add_argument("--model", default=None)
    pre.add_argument("--out", type=Path, default=Path("kvevict-results"))
    pre.add_argument("--no-progress", action="store_true")
    pre.set_defaults(func=run_prefix)


QUICK_PREFIX = dict(documents=2, questions=2, doc_len=512, budget=64, kv_blocks=40)
QUICK_EVAL = dict(budgets=[128], contexts=[512], depths=[0.5], samples=2)
QUICK_CAPACITY = dict(budget=64, kv_blocks=40, block_size=32, requests=6, prompt_len=512, max_tokens=32,
                      policies=["snapkv", "streamingllm"])


def _model(arg: str | None) -> str:
    if arg:
        if not (Path(arg) / "config.json").is_file():
            raise ValueError(f"--model {arg!r} is not a Hugging Face directory (no config.json)")
        return arg
    from vllm_kvevict.models.smollm2 import prepare_default_model

    return str(prepare_default_model())


def _spec_kwargs(args: argparse.Namespace, mapping: dict[str, str], quick: dict[str, Any]) -> dict[str, Any]:
    """Quick defaults, then whatever the user gave explicitly."""
    kwargs = dict(quick) if args.quick else {}
    for arg, field in mapping.items():
        value = getattr(args, arg)
        if value is not None:
            kwargs[field] = value
    return kwargs


def _write(out: Path, name: str, doc: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def run_eval(args: argparse.Namespace) -> int:
    from vllm_kvevict.eval import report, runner

    kwargs = _spec_kwargs(args, {"policies": "policies", "budgets": "budgets", "context": "contexts",
                                 "policy_context": "policy_contexts", "tasks": "tasks", "depths": "depths",
                                 "samples": "samples"}, QUICK_EVAL)
    spec = runner.EvalSpec(seed=args.seed, kv_gib=args.kv_gib, **kwargs)
    spec.validate()  # before the model loads: a bad flag fails in a second
    existing = args.out / "eval.json"
    if args.update and (not args.policies or not existing.is_file()):
        state = "exists" if existing.is_file() else "does not exist"
        raise ValueError(f"--update re-runs --policies into an existing result: give --policies and an --out "
                         f"holding eval.json ({str(existing)!r} {state})")
    model = _model(args.model)
    old = json.loads(existing.read_text()) if args.update else None
    if old is not None:
        runner.check_same_grid(old, model, runner.spec_record(spec))  # before the run, not after it
    doc = runner.run(spec, model, progress=not args.no_progress)
    if old is not None:
        doc = runner.merge(old, doc)
    markdown = report.eval_markdown(doc)
    _write(args.out, "eval", doc, markdown)
    plots = report.eval_plots(doc, args.out)
    print(markdown)
    print(f"wrote {args.out / 'eval.json'}, {args.out / 'eval.md'}, " + ", ".join(str(p) for p in plots))
    return 0


def run_capacity(args: argparse.Namespace) -> int:
    from vllm_kvevict.bench import capacity
    from vllm_kvevict.eval import report

    kwargs = _spec_kwargs(args, {"policies": "policies", "budget": "budget", "kv_blocks": "kv_blocks",
                                 "block_size": "block_size", "requests": "requests", "prompt_len": "prompt_len",
                                 "max_tokens": "max_tokens", "decode_interval": "decode_interval"}, QUICK_CAPACITY)
    spec = capacity.CapacitySpec(**kwargs)
    spec.validate()
    doc = capacity.run(spec, _model(args.model), progress=not args.no_progress)
    markdown = report.capacity_markdown(doc)
    _write(args.out, "capacity", doc, markdown)
    plots = [report.capacity_plot(doc, args.out), report.capacity_timeline_plot(doc, args.out)]
    print(markdown)
    print(f"wrote {args.out / 'capacity.json'}, {args.out / 'capacity.md'}, {', '.join(str(p) for p in plots if p)}")
    return 0


def run_prefix(args: argparse.Namespace) -> int:
    from vllm_kvevict.bench import prefix

    kwargs = _spec_kwargs(args, {"policy": "policy", "budget": "budget", "documents": "documents",
                                 "questions": "questions", "doc_len": "doc_len", "kv_blocks": "kv_blocks",
                                 "repeats": "repeats"}, QUICK_PREFIX)
    spec = prefix.PrefixSpec(**kwargs)
    spec.validate()
    doc = prefix.run(spec, _model(args.model), progress=not args.no_progress)
    markdown = prefix.markdown(doc)
    _write(args.out, "prefix", doc, markdown)
    print(markdown)
    print(f"wrote {args.out / 'prefix.json'}, {args.out / 'prefix.md'}")
    return 0
