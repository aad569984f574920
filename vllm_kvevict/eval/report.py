"""Markdown tables and PNG plots for `eval` and `bench capacity` result documents."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

TASK_TITLES = {
    "passkey": "passkey (filler)",
    "niah": "needle (natural text)",
    "niah_multikey": "needle + 3 distractors",
    "niah_multivalue": "4 values, one key",
    "vt": "variable tracking",
    "agreement": "greedy agreement with full cache",
    "ppl": "teacher-forced top-1 (ppl)",
}


def _budget_key(budget: Any) -> tuple:
    return (0, 0.0) if budget is None else (1, float(budget))


def _fmt_budget(budget: Any) -> str:
    """'full', a token count, or a prompt ratio (as 1/n when it is one)."""
    if budget is None:
        return "full"
    if isinstance(budget, float):
        inverse = 1.0 / budget if budget > 0 else 0.0
        return f"1/{round(inverse)}" if inverse > 1 and abs(inverse - round(inverse)) < 1e-6 else f"{budget:g}"
    return str(budget)


def _ordered(values: Iterable) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def needle_summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Pooled needle accuracy per (policy, budget): every needle-task sample of every context and depth
    counts once, with its Wilson 95% interval, and `of_full`: its ratio to the full cache's accuracy
    pooled over the same (task, context) cells."""
    from vllm_kvevict.eval.scoring import wilson
    from vllm_kvevict.eval.tasks import NEEDLE_TASKS

    needle = [r for r in doc["records"] if r["task"] in NEEDLE_TASKS]
    full = {(r["task"], r["context"]): r for r in needle if r["policy"] == "none"}
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in needle:
        cells[(r["policy"], r["budget"])].append(r)
    out = []
    for (policy, budget), recs in cells.items():
        n = sum(r["n"] for r in recs)
        hits = sum(r["accuracy"] * r["n"] for r in recs)
        ref = [full[(r["task"], r["context"])] for r in recs if (r["task"], r["context"]) in full]
        ref_acc = sum(r["accuracy"] * r["n"] for r in ref) / max(1, sum(r["n"] for r in ref))
        low, high = wilson(hits, n)
        out.append({"policy": policy, "budget": budget, "accuracy": hits / n, "n": n, "ci_low": low, "ci_high": high,
                    "of_full": hits / n / ref_acc if ref_acc > 0 else float("nan")})
    return out


def needle_summary_markdown(doc: dict[str, Any]) -> str:
    """A row per policy, a column per budget: 'accuracy [interval] n, x of full'."""
    rows = needle_summary(doc)
    if not rows:
        return ""
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, key=_budget_key)
    index = {(r["policy"], r["budget"]): r for r in rows}
    lines = ["Needle accuracy pooled over the needle tasks, contexts and depths: accuracy [Wilson 95%], n samples, "
             "and its ratio to the full cache's on the same cells.", "",
             "| policy | " + " | ".join(_fmt_budget(b) for b in [None] + budgets) + " |",
             "|---" * (len(budgets) + 2) + "|"]
    for policy in _ordered(r["policy"] for r in rows):
        cells = []
        for budget in [None] + budgets:
            r = index.get((policy, budget))
            cells.append("" if r is None else f"{r['accuracy']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                         f"n={r['n']}" + ("" if budget is None else f", {r['of_full']:.2f} of full"))
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def eval_markdown(doc: dict[str, Any]) -> str:
    """The pooled needle table, then one table per (task, context): a row per policy, a column per
    budget, 'acc [lo, hi]' cells."""
    records = doc["records"]
    lines = [f"Model `{Path(str(doc.get('model', '?'))).name}`, {doc.get('date', '')}; "
             f"{doc.get('requests', '?')} requests, {doc.get('seconds', '?')} s. Cells: accuracy "
             "[95% interval], n samples; `full` is the full cache (`none`)."]
    for update in doc.get("updates", []):
        lines[0] += (f" Re-run {update['date']} (`eval --update`, {update['requests']} requests, "
                     f"{update['seconds']} s): {', '.join(update['policies'])}.")
    lines += ["", needle_summary_markdown(doc)]
    tasks = _ordered(r["task"] for r in records)
    contexts = sorted({r["context"] for r in records})
    budgets = sorted({r["budget"] for r in records if r["budget"] is not None}, key=_budget_key)
    policies = _ordered(r["policy"] for r in records)
    index = {(r["policy"], r["budget"], r["context"], r["task"]): r for r in records}
    for task in tasks:
        for context in contexts:
            if not any(k[2] == context and k[3] == task for k in index):
                continue
            lines += [f"**{TASK_TITLES.get(task, task)}**, {context} tokens", ""]
            lines.append("| policy | " + " | ".join(_fmt_budget(b) for b in [None] + budgets) + " |")
            lines.append("|---" * (len(budgets) + 2) + "|")
            for policy in policies:
                cells = []
                for budget in [None] + budgets:
                    rec = index.get((policy, budget, context, task))
                    if rec is None:
                        cells.append("")
                        continue
                    cell = f"{rec['accuracy']:.2f} [{rec['ci_low']:.2f}, {rec['ci_high']:.2f}] n={rec['n']}"
                    if "perplexity" in rec:
                        cell += f", ppl {rec['perplexity']:.2f}"
                    cells.append(cell)
                if any(cells):
                    lines.append(f"| {policy} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def eval_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy_vs_budget_<context>.png (a panel per task) and needle_depth.png (heat maps)."""
    plt = _plt()
    records = doc["records"]
    written: list[Path] = []
    tasks = _ordered(r["task"] for r in records)
    policies = [p for p in _ordered(r["policy"] for r in records) if p != "none"]
    for context in sorted({r["context"] for r in records}):
        recs = [r for r in records if r["context"] == context]
        ctx_tasks = [t for t in tasks if any(r["task"] == t for r in recs)]
        if not ctx_tasks:
            continue
        cols = min(4, len(ctx_tasks))
        rows = (len(ctx_tasks) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax, task in zip(axes.flat, ctx_tasks):
            full = [r for r in recs if r["task"] == task and r["policy"] == "none"]
            if full:
                ax.axhline(full[0]["accuracy"], color="black", ls="--", lw=1, label="full cache")
            for policy in policies:
                pts = sorted((r for r in recs if r["task"] == task and r["policy"] == policy),
                             key=lambda r: _budget_key(r["budget"]))
                if pts:
                    xs = [float(r["budget"]) for r in pts]
                    ax.errorbar(xs, [r["accuracy"] for r in pts], marker="o", ms=3, lw=1, capsize=2, label=policy,
                                yerr=[[r["accuracy"] - r["ci_low"] for r in pts], [r["ci_high"] - r["accuracy"] for r in pts]])
            ax.set_title(TASK_TITLES.get(task, task), fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("budget (tokens per KV head)" if all(isinstance(r["budget"], int) or r["budget"] is None
                                                               for r in recs) else "budget")
            ax.set_ylabel("accuracy")
        for ax in list(axes.flat)[len(ctx_tasks):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
        fig.suptitle(f"Accuracy vs KV budget, {context}-token prompts ({Path(str(doc.get('model', ''))).name})")
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        path = out_dir / f"accuracy_vs_budget_{context}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    heat = _depth_heatmaps(doc, plt, out_dir)
    if heat:
        written.append(heat)
    return written


def _depth_heatmaps(doc: dict[str, Any], plt, out_dir: Path) -> Path | None:
    """Needle depth x context, accuracy over every needle task; a panel per (policy, budget)."""
    cells: dict[tuple, list[tuple[float, int]]] = defaultdict(list)
    for r in doc.get("by_depth", []):
        cells[(r["policy"], r["budget"], r["context"], r["depth"])].append((r["accuracy"], r["n"]))
    if not cells:
        return None
    configs = _ordered((p, b) for p, b, _, _ in sorted(cells, key=lambda k: (k[0] != "none", k[0], _budget_key(k[1]))))
    contexts = sorted({k[2] for k in cells})
    depths = sorted({k[3] for k in cells})
    cols = min(4, len(configs))
    rows = (len(configs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 0.9 * len(contexts) * cols, 1.0 + (0.9 + 0.32 * len(depths)) * rows),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, (policy, budget) in zip(axes.flat, configs):
        grid = []
        for depth in depths:
            row = []
            for context in contexts:
                vals = cells.get((policy, budget, context, depth))
                row.append(sum(a * n for a, n in vals) / sum(n for _, n in vals) if vals else float("nan"))
            grid.append(row)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(f"{policy} @ {_fmt_budget(budget)}", fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    fig.supxlabel("prompt tokens", fontsize=8)
    fig.supylabel("needle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy (needle tasks)")
    path = out_dir / "needle_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def capacity_markdown(doc: dict[str, Any]) -> str:
    lines = [f"Model `{Path(str(doc.get('model', '?'))).name}`, {doc.get('date', '')}; KV pool {doc['kv_blocks']} "
             f"blocks of {doc.get('block_size', '?')} tokens; {doc.get('requests', '?')} requests of "
             f"{doc.get('prompt_len', '?')} prompt + {doc.get('max_tokens', '?')} output tokens, all submitted at once.",
             "",
             "| policy | budget | blocks/request | peak running | output tok/s | TTFT p50 / p95 (s) | ITL p50 / p95 (s) "
             "| x concurrency | x throughput | x ITL p50 | lone TTFT (s) | compaction (s) | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["records"]:
        ratio = r["ratio_vs_none"]
        lone = (f"{r['lone_ttft_s']:.2f} (x{ratio['lone_ttft_s']:.2f})" if "lone_ttft_s" in r else "-")
        itl = f"{ratio['itl_p50_s']:.2f}" if "itl_p50_s" in ratio else "-"
        compaction = f"{r['compaction_s']:.2f}" if "compaction_s" in r else "-"
        agreement = f"{r['agreement']:.2f}" if "agreement" in r else "-"
        if "agreement_vs_no_interval" in r:
            agreement += f" ({r['agreement_vs_no_interval']:.2f} vs no interval)"
        lines.append(
            f"| {_capacity_label(r)} | {_fmt_budget(r['budget'])} | {r['blocks_per_request']:.1f} | {r['peak_running']} | "
            f"{r['output_tok_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
            f"{r['itl_p50_s']:.3f} / {r['itl_p95_s']:.3f} | {ratio['peak_running']:.2f} | {ratio['output_tok_s']:.2f} | "
            f"{itl} | {lone} | {compaction} | {agreement} |")
    if any(r.get("decode_interval") for r in doc["records"]):
        lines += ["", "agreement: the fraction of `none`'s greedy output each request reproduces before its first "
                  "different token, mean over requests (in brackets: against the same policy without an interval); "
                  "`+ interval N`: the tail re-compacted every N generated tokens."]
    return "\n".join(lines) + "\n"


def _capacity_label(record: dict[str, Any]) -> str:
    interval = record.get("decode_interval") or 0
    return record["policy"] + (f" + interval {interval}" if interval else "")


def capacity_timeline_plot(doc: dict[str, Any], out_dir: Path) -> Path | None:
    """capacity_timeline.png: running requests and KV blocks in use over each policy's run (why a ratio is
    what it is: how many fit, and how long the prefills hold the pool). None without timelines."""
    recs = [r for r in doc["records"] if r.get("timeline")]
    if not recs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for r in recs:
        t, running, _waiting, blocks = zip(*r["timeline"])
        label = _capacity_label(r) if r["budget"] is None else f"{_capacity_label(r)} @{_fmt_budget(r['budget'])}"
        axes[0].step(t, running, where="post", label=label)
        axes[1].step(t, blocks, where="post", label=label)
    axes[0].set_title("running requests", fontsize=9)
    axes[1].set_title(f"KV blocks in use (pool {doc['kv_blocks']})", fontsize=9)
    for ax in axes:
        ax.set_xlabel("seconds since submission", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{doc.get('requests')} x {doc.get('prompt_len')}-token prompts, {doc.get('max_tokens')} output "
                 "tokens each", fontsize=10)
    fig.tight_layout()
    path = out_dir / "capacity_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def capacity_plot(doc: dict[str, Any], out_dir: Path) -> Path:
    plt = _plt()
    recs = doc["records"]
    names = [_capacity_label(r) if r["budget"] is None else f"{_capacity_label(r)}\n@{_fmt_budget(r['budget'])}" for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3, 3.6))
    panels = [("blocks_per_request", "KV blocks per request"), ("peak_running", "peak running requests"),
              ("output_tok_s", "output tokens / s")]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in recs]
        bars = ax.bar(range(len(recs)), values, color=["#777777"] + ["#2a7ab0"] * (len(recs) - 1))
        ax.set_xticks(range(len(recs)), names, fontsize=7, rotation=45, ha="right")
        ax.set_title(title, fontsize=9)
        for bar, r in zip(bars, recs):
            if key in r["ratio_vs_none"]:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"x{r['ratio_vs_none'][key]:.2f}",
                        ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"Capacity under a {doc['kv_blocks']}-block KV pool: {doc.get('requests')} x "
                 f"{doc.get('prompt_len')}-token prompts", fontsize=10)
    fig.tight_layout()
    path = out_dir / "capacity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
