"""Assemble docs/results.md from the latest `eval` and `bench capacity` runs (`make results` runs all).

    .venv/bin/python scripts/results_md.py [--eval docs/results/eval] [--capacity docs/results/capacity]

Hand-written sections (ablations, profiles, goal lines) live in docs/results/notes/ and are included,
in name order, after the part they belong to: `quality_*.md` after the quality tables, `capacity_*.md`
after the capacity runs, `prefix_*.md` after the shared-prefix run. Regenerating never drops them; edit them there, not in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path

from vllm_kvevict.eval.report import _fmt_budget, capacity_markdown, eval_markdown, needle_summary_markdown
from vllm_kvevict.eval.tasks import NEEDLE_TASKS

ROOT = Path(__file__).resolve().parents[1]


def _summary(doc: dict) -> list[str]:
    """Headline tables: mean needle accuracy per (policy, budget), agreement and perplexity."""
    recs = doc["records"]
    contexts = sorted({r["context"] for r in recs if r["policy"] != "none"})
    budgets = sorted({r["budget"] for r in recs if r["budget"] is not None}, key=float)
    lines = []
    full = defaultdict(dict)
    for r in recs:
        if r["policy"] == "none" and r["task"] in NEEDLE_TASKS:
            full[r["task"]][r["context"]] = r
    all_ctx = sorted({c for t in full.values() for c in t})
    lines += ["### Full cache (`none`): can the model do the task at all?", "",
              "| task | " + " | ".join(f"{c} tokens" for c in all_ctx) + " |", "|---" * (len(all_ctx) + 1) + "|"]
    for task, by_ctx in full.items():
        cells = [f"{by_ctx[c]['accuracy']:.2f} (n={by_ctx[c]['n']})" if c in by_ctx else "" for c in all_ctx]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("")
    for context in contexts:
        cell = defaultdict(list)
        extra = {}
        for r in recs:
            if r["context"] != context:
                continue
            if r["task"] in NEEDLE_TASKS:
                cell[(r["policy"], r["budget"])].append((r["accuracy"], r["n"]))
            else:
                extra[(r["policy"], r["budget"], r["task"])] = r
        policies = [p for p in dict.fromkeys(r["policy"] for r in recs)]
        lines += [f"### {context}-token prompts: mean over the needle tasks / agreement / perplexity", "",
                  "Needle accuracy is the mean over " + ", ".join(t for t in NEEDLE_TASKS if any(
                      r['task'] == t for r in recs)) + " (each sample counts once). Agreement: share of the full "
                  "cache's first 32 greedy tokens reproduced. Perplexity: 64 teacher-forced tokens after compaction.",
                  "", "| policy | " + " | ".join(f"needle @{_fmt_budget(b)}" for b in budgets) + " | "
                  + " | ".join(f"agree @{_fmt_budget(b)}" for b in budgets) + " | "
                  + " | ".join(f"ppl @{_fmt_budget(b)}" for b in budgets) + " |",
                  "|---" * (3 * len(budgets) + 1) + "|"]
        for policy in policies:
            row = []
            for b in ([None] if policy == "none" else budgets):
                vals = cell.get((policy, b), [])
                row.append(f"{sum(a * n for a, n in vals) / sum(n for _, n in vals):.2f}" if vals else "")
            if policy == "none":
                row = row * len(budgets)
                row += ["1.00"] * len(budgets)
                ppl = extra.get(("none", None, "ppl"))
                row += [f"{ppl['perplexity']:.2f}" if ppl else ""] * len(budgets)
            else:
                for task, fmt in (("agreement", "accuracy"), ("ppl", "perplexity")):
                    for b in budgets:
                        r = extra.get((policy, b, task))
                        row.append(f"{r[fmt]:.2f}" if r else "")
            lines.append(f"| {policy} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _capacity_run(title: str, folder: Path, rel) -> list[str]:
    """A further `bench capacity` run (its command, table, plots), or nothing when it was not run."""
    path = folder / "capacity.json"
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    spec = doc["spec"]
    interval = f" --decode-interval {spec['decode_interval']}" if spec.get("decode_interval") else ""
    return [
        f"### {title}", "",
        "    " + f"vllm-kvevict bench capacity --policies {','.join(spec['policies'])} --budget "
        f"{_fmt_budget(spec['budget'])} --kv-blocks {spec['kv_blocks']} --requests {spec['requests']} --prompt-len "
        f"{spec['prompt_len']} --max-tokens {spec['max_tokens']}{interval} --out {rel(folder)}", "",
        capacity_markdown(doc), f"![capacity]({rel(folder)}/capacity.png)", "",
        f"![running requests and KV blocks over time]({rel(folder)}/capacity_timeline.png)", "",
    ]


def _eval_run(title: str, folder: Path, rel) -> list[str]:
    """A further `eval` run (its command and pooled needle table), or nothing when it was not run."""
    path = folder / "eval.json"
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    return [f"### {title}", "", "    " + _eval_command(doc["spec"], rel(folder)), "", needle_summary_markdown(doc), "",
            f"Every cell: [`{rel(folder)}/eval.md`]({rel(folder)}/eval.md).", ""]


def _eval_command(es: dict, out: str) -> str:
    return (f"vllm-kvevict eval --context {','.join(map(str, es['contexts']))}"
            + (f" --policy-context {','.join(map(str, es['policy_contexts']))}" if es.get("policy_contexts") else "")
            + f" --budgets {','.join(_fmt_budget(b) for b in es['budgets'])} --tasks {','.join(es['tasks'])}"
            f" --depths {','.join(f'{d:g}' for d in es['depths'])} --samples {es['samples']} --seed {es['seed']}"
            f" --policies {','.join(es['policies'])} --out {out}")


def _prefix_run(folder: Path, rel) -> list[str]:
    """The shared-prefix chat benchmark (`bench prefix`), or nothing when it was not run."""
    from vllm_kvevict.bench.prefix import markdown as prefix_markdown

    path = folder / "prefix.json"
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    spec = doc["spec"]
    return ["## Prefix caching with eviction", "",
            "    " + f"vllm-kvevict bench prefix --policy {spec['policy']} --budget {_fmt_budget(spec['budget'])} "
            f"--documents {spec['documents']} --questions {spec['questions']} --doc-len {spec['doc_len']} "
            f"--kv-blocks {spec['kv_blocks']}{_repeats(spec)} --out {rel(folder)}", "",
            prefix_markdown(doc).split("\n", 1)[1]]


def _repeats(spec: dict) -> str:
    return f" --repeats {spec['repeats']}" if spec.get("repeats", 1) > 1 else ""


def _notes(folder: Path, part: str) -> list[str]:
    """The hand-written sections for `part`, in name order."""
    return [p.read_text().rstrip() + "\n" for p in sorted(folder.glob(f"{part}_*.md"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, default=ROOT / "docs/results/eval")
    ap.add_argument("--capacity", type=Path, default=ROOT / "docs/results/capacity")
    ap.add_argument("--capacity-decode", type=Path, default=ROOT / "docs/results/capacity_decode",
                    help="the decode-heavy capacity run (skipped when absent)")
    ap.add_argument("--capacity-long", type=Path, default=ROOT / "docs/results/capacity_long",
                    help="the long-generation capacity run (skipped when absent)")
    ap.add_argument("--eval-contexts", type=Path, default=ROOT / "docs/results/eval_contexts",
                    help="the goal policies' run at the other contexts (skipped when absent)")
    ap.add_argument("--prefix", type=Path, default=ROOT / "docs/results/prefix",
                    help="the shared-prefix chat run (skipped when absent)")
    ap.add_argument("--notes", type=Path, default=ROOT / "docs/results/notes")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results.md")
    args = ap.parse_args()
    ev = json.loads((args.eval / "eval.json").read_text())
    cap = json.loads((args.capacity / "capacity.json").read_text())
    es, cs = ev["spec"], cap["spec"]
    rel = lambda p: p.relative_to(args.out.parent).as_posix()  # noqa: E731
    eval_cmd = _eval_command(es, rel(args.eval))
    cap_cmd = (f"vllm-kvevict bench capacity --policies {','.join(cs['policies'])} --budget {_fmt_budget(cs['budget'])}"
               f" --kv-blocks {cs['kv_blocks']} --block-size {cs['block_size']} --requests {cs['requests']}"
               f" --prompt-len {cs['prompt_len']} --max-tokens {cs['max_tokens']} --out {rel(args.capacity)}")
    lines = [
        "# Results", "",
        "The latest full runs of `vllm-kvevict eval` and `vllm-kvevict bench capacity` (regenerate with "
        "`make results` whenever a policy changes; it runs both and then `scripts/results_md.py`).",
        "",
        f"- Model: `{Path(ev['model']).name}` (the default model), real vLLM 0.32 with this plugin, "
        f"fp32, eager, on a {platform.machine()} CPU machine with 2 cores.",
        f"- Quality run: {ev['date']}, {ev['requests']} requests, {ev['prompt_tokens']:,} prompt tokens, "
        f"{ev['seconds'] / 60:.0f} min.", f"- Capacity run: {cap['date']}.", "",
        "Commands:", "", "    " + eval_cmd, "    " + cap_cmd, "",
        "## Quality under compression", "",
        "Budgets are tokens kept per KV head (per layer), the whole prompt is compressed (the question "
        "and the answer prefix sit in the last 32 tokens, SnapKV's observation window). Intervals are 95% "
        f"(Wilson for pass/fail tasks, bootstrap otherwise); with n = {max(r['n'] for r in ev['records'])} per cell "
        "at most they are wide: read the "
        "tables for trends, not for ranks between close policies.", "",
        needle_summary_markdown(ev),
        *_summary(ev),
        f"![accuracy vs budget]({rel(args.eval)}/accuracy_vs_budget_{min(r['context'] for r in ev['records'] if r['policy'] != 'none')}.png)",
        "", f"![needle depth]({rel(args.eval)}/needle_depth.png)", "",
        "<details><summary>Every task, every cell</summary>", "", eval_markdown(ev), "</details>", "",
        *_eval_run("The goal policies at 1K and 4K", args.eval_contexts, rel),
        *_notes(args.notes, "quality"),
        "## Capacity under memory pressure", "",
        "Prefill-heavy (128 output tokens per 2K prompt): the run's time is mostly prefill, the same work "
        "for every policy, so eviction's extra concurrency moves throughput far less than it moves concurrency.", "",
        capacity_markdown(cap), f"![capacity]({rel(args.capacity)}/capacity.png)", "",
    ]
    for title, folder in (("Decode-heavy", args.capacity_decode), ("Long generations", args.capacity_long)):
        lines += _capacity_run(title, folder, rel)
    lines += _notes(args.notes, "capacity")
    lines += _prefix_run(args.prefix, rel)
    lines += _notes(args.notes, "prefix")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
