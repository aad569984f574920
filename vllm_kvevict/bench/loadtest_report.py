"""The load test's report: its charts (one PNG per chart, series from Prometheus and the client's
percentiles) and its Markdown table; `loadtest.run` calls `plot`, the CLI prints `markdown`."""

from __future__ import annotations

from pathlib import Path

PERCENTILES = (50, 95, 99)
CHART_UNITS = {"throughput": "tokens / s", "latency": "TTFT seconds", "kv_usage": "KV cache usage %",
               "evictions": "evicted tokens / s"}
#: Lines drawn against a right-hand axis (another unit or scale than the chart's first line).
RIGHT_AXIS = {"ITL p50": "ITL seconds (dashed)", "ITL p95": "ITL seconds (dashed)", "requests running": "requests", "requests waiting": "requests",
              "freed blocks/s": "blocks or compactions / s", "compactions/s": "blocks or compactions / s"}


def _break_gaps(points: list, gap_s: float, t0: float) -> tuple[list, list]:
    """x (seconds since t0) and y with a NaN wherever Prometheus had no value (e.g. a latency
    quantile while nothing finished), so matplotlib leaves a gap instead of a misleading line."""
    xs, ys = [], []
    for k, (t, v) in enumerate(points):
        if k and t - points[k - 1][0] > gap_s:
            xs.append(t - t0 - gap_s / 2)
            ys.append(float("nan"))
        xs.append(t - t0)
        ys.append(v)
    return xs, ys


def _draw_series(ax, report: dict, chart: str, colors: list[str]) -> None:
    t0 = report["start"]
    for k, phase in enumerate(report["phases"]):
        ax.axvspan(phase["start"] - t0, phase["end"] - t0, color=colors[k % len(colors)], alpha=0.08)
        ax.text(phase["start"] - t0, 1.01, phase["policy"], transform=ax.get_xaxis_transform(), fontsize=8)
    right = None
    handles = []
    for k, line in enumerate(report["series"][chart]):
        if not line["points"]:
            continue
        target = ax
        if line["legend"] in RIGHT_AXIS:
            if right is None:
                right = ax.twinx()
                right.set_ylabel(RIGHT_AXIS[line["legend"]])
            target = right
        xs, ys = _break_gaps(line["points"], 2.5 * report["spec"]["scrape_interval_s"], t0)
        style = "--" if target is right else "-"
        handles += target.plot(xs, ys, style, label=line["legend"], linewidth=1.4,
                               color=colors[k % len(colors)])
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(CHART_UNITS.get(chart, ""))
    ax.set_title(f"{chart.replace('_', ' ')} (Prometheus)", fontsize=10, pad=14)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper right")


def _draw_percentiles(ax, report: dict, metric: str) -> None:
    phases = report["phases"]
    width = 0.8 / len(PERCENTILES)
    for j, pct in enumerate(PERCENTILES):
        vals = [p["client"].get(f"p{pct}_{metric}_ms") or 0.0 for p in phases]
        ax.bar([i + (j - 1) * width for i in range(len(phases))], vals, width, label=f"p{pct}")
    ax.set_xticks(range(len(phases)), [p["policy"] for p in phases])
    ax.set_title(f"{metric.upper()} per policy (client, ms)", fontsize=10)
    ax.legend(fontsize=8)


def plot(report: dict, out: Path) -> list[str]:
    """One PNG per time-series chart, summary.png (per-phase percentiles) and overview.png (all of
    them on one page, the dashboard-like picture in docs/deploy.md); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for chart in report["series"]:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        _draw_series(ax, report, chart, colors)
        fig.tight_layout()
        fig.savefig(out / f"{chart}.png", dpi=110)
        plt.close(fig)
        written.append(f"{chart}.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("ttft", "itl")):
        _draw_percentiles(ax, report, metric)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    written.append("summary.png")

    charts = list(report["series"])
    rows = (len(charts) + 2 + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.4 * rows))
    flat = list(axes.flat)
    for ax, chart in zip(flat, charts):
        _draw_series(ax, report, chart, colors)
    for ax, metric in zip(flat[len(charts):], ("ttft", "itl")):
        _draw_percentiles(ax, report, metric)
    for ax in flat[len(charts) + 2:]:
        ax.axis("off")
    fig.suptitle(f"vllm-kvevict load test: {report['model']}, " + " vs ".join(p["policy"] for p in report["phases"]),
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=90)
    plt.close(fig)
    written.append("overview.png")
    return written


def markdown(report: dict) -> str:
    """A table of the phases side by side, ratios to the first phase."""
    phases = report["phases"]
    base = phases[0]
    rows = ["| policy | req/s | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | peak KV % | evicted tokens |",
            "|---|---|---|---|---|---|---|"]
    for p in phases:
        c, m = p["client"], p["prometheus"]
        ratio = c["output_throughput"] / base["client"]["output_throughput"] if base["client"]["output_throughput"] else 0
        rows.append(f"| {p['policy']} | {c['request_throughput']:.2f} | {c['output_throughput']:.1f} ({ratio:.2f}x) | "
                    f"{c['p50_ttft_ms']:.0f} / {c['p95_ttft_ms']:.0f} | {c['p50_itl_ms']:.0f} / {c['p95_itl_ms']:.0f} | "
                    f"{100 * (m['kv_usage_max'] or 0):.1f} | {m['evicted_tokens']:.0f} |")
    return "\n".join(rows)
