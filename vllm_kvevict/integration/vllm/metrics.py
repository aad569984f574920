"""Eviction metrics: counted in the scheduler (engine process), exported on the API server's /metrics.

Channel: `SchedulerStats` is what vLLM ships from engine core to the front end each step, and it
has no free-form field; only declared fields survive serialization. `kv_connector_stats` is a
plain dict, so the scheduler adds one reserved key, `PAYLOAD_KEY`, holding what happened since the
last stats (plain dicts and lists). In the front end we wrap `StatLoggerManager.record`, the one
place every stat logger is fed from, to take the key out before vLLM's own loggers see it (they
would read it as connector stats) and to feed our Prometheus metrics:

    vllm_kvevict:evicted_tokens_total{policy}   prompt tokens dropped by compaction
    vllm_kvevict:freed_blocks_total{policy}     KV blocks returned to the pool
    vllm_kvevict:compactions_total{policy}      compactions (a prompt's, and decode-time ones)
    vllm_kvevict:kept_ratio{policy}             histogram: kept / prompt tokens per compacted request
    vllm_kvevict:selection_cache_hits_total{policy}    selections reused (per layer; selecting policies)
    vllm_kvevict:selection_cache_misses_total{policy}  selections computed (per layer)
    vllm_kvevict:selected_tokens{policy}        histogram: tokens a selecting request attended to in a
                                                step (mean over layers)
    vllm_kvevict:compaction_seconds{policy}     histogram: worker time of one request's compaction
                                                (scoring, selection and moving KV, all layers)
    vllm_kvevict:kv_cache_tokens{policy,kind}   gauge: KV tokens of running requests, kind = logical
                                                (positions) or physical (what the cache holds)
    vllm_kvevict:policy_info{policy,budget}     gauge, always 1: the server-wide policy and budget

Selection counts and compaction times start in the worker; they reach the scheduler on the
ModelRunnerOutput (attribute `REPORT_ATTR`) and travel on from there like the compaction events.

The metrics live in prometheus_client's default registry, which vLLM's /metrics serves (and which
prometheus_client's multiprocess mode covers when vLLM turns it on).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

PAYLOAD_KEY = "vllm_kvevict"
#: ModelRunnerOutput attribute carrying a step's worker report (`core.state.WorkerReport.drain`) to the
#: scheduler: the MP executor pickles the object whole, so an attribute survives; the scheduler reads it
#: in update_from_output.
REPORT_ATTR = "kvevict_report"
_MARK = "_kvevict_wrapped"
KEPT_RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SELECTED_BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
COMPACTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class EvictionCounters:
    """Cumulative counts by policy (scheduler side), plus the events not yet shipped."""

    evicted_tokens: dict[str, int] = field(default_factory=dict)
    freed_blocks: dict[str, int] = field(default_factory=dict)
    compactions: dict[str, int] = field(default_factory=dict)
    kept_ratios: deque = field(default_factory=lambda: deque(maxlen=4096))  # the latest (policy, ratio)
    selection_hits: dict[str, int] = field(default_factory=dict)
    selection_misses: dict[str, int] = field(default_factory=dict)
    compaction_seconds: dict[str, float] = field(default_factory=dict)  # worker time, summed
    _pending: list[list[Any]] = field(default_factory=list, repr=False)
    _pending_selection: list[list[Any]] = field(default_factory=list, repr=False)
    _pending_times: list[list[Any]] = field(default_factory=list, repr=False)

    def add(self, policy: str, evicted: int, freed: int, ratio: float | None) -> None:
        """One compaction; `ratio` (kept / prompt tokens) for a prompt's, None for a decode-time one."""
        self.evicted_tokens[policy] = self.evicted_tokens.get(policy, 0) + evicted
        self.freed_blocks[policy] = self.freed_blocks.get(policy, 0) + freed
        self.compactions[policy] = self.compactions.get(policy, 0) + 1
        if ratio is not None:
            self.kept_ratios.append((policy, ratio))
        self._pending.append([policy, evicted, freed, ratio])

    def add_worker_report(self, report: dict[str, list[list[Any]]]) -> None:
        """One step's report from the worker (core.state.WorkerReport.drain)."""
        self.add_selection(report.get("selection", ()))
        for policy, seconds in report.get("compaction_s", ()):
            self.compaction_seconds[policy] = self.compaction_seconds.get(policy, 0.0) + float(seconds)
            self._pending_times.append([policy, float(seconds)])

    def add_selection(self, counts) -> None:
        """Selection counts: [[policy, hits, misses, [selected, ...]], ...]."""
        for policy, hits, misses, selected in counts:
            self.selection_hits[policy] = self.selection_hits.get(policy, 0) + hits
            self.selection_misses[policy] = self.selection_misses.get(policy, 0) + misses
            self._pending_selection.append([policy, hits, misses, list(selected)])

    def drain(self, kv_tokens: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """What happened since the last drain: {"compactions": [[policy, evicted_tokens, freed_blocks,
        kept_ratio or None], ...], "selection": [[policy, hits, misses, [selected, ...]], ...],
        "compaction_s": [[policy, seconds], ...]}, each key only when it has entries, plus the scheduler's
        `kv_tokens` snapshot {policy: [logical, physical]} when given (even empty: the gauges drop to 0)."""
        out: dict[str, Any] = {}
        if self._pending:
            out["compactions"], self._pending = self._pending, []
        if self._pending_selection:
            out["selection"], self._pending_selection = self._pending_selection, []
        if self._pending_times:
            out["compaction_s"], self._pending_times = self._pending_times, []
        if kv_tokens is not None:
            out["kv_tokens"] = kv_tokens
        return out


def attach(stats, events: dict[str, list[list[Any]]]) -> None:
    """Put the events on a SchedulerStats (scheduler side)."""
    if stats is None or not events:
        return
    payload = dict(stats.kv_connector_stats or {})
    payload[PAYLOAD_KEY] = events
    stats.kv_connector_stats = payload


def take(stats) -> dict[str, list[list[Any]]]:
    """Remove and return our events from a SchedulerStats (front end side)."""
    if stats is None or not stats.kv_connector_stats or PAYLOAD_KEY not in stats.kv_connector_stats:
        return {}
    payload = dict(stats.kv_connector_stats)
    events = payload.pop(PAYLOAD_KEY)
    stats.kv_connector_stats = payload or None
    return dict(events)


class PromMetrics:
    """Our metrics, created once per process in the default registry."""

    _instance: PromMetrics | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.evicted = Counter("vllm_kvevict:evicted_tokens", "Prompt tokens evicted by compaction.", ["policy"])
        self.freed = Counter("vllm_kvevict:freed_blocks", "KV blocks freed by compaction.", ["policy"])
        self.compactions = Counter("vllm_kvevict:compactions", "Requests whose prompt was compacted.", ["policy"])
        self.kept_ratio = Histogram(
            "vllm_kvevict:kept_ratio", "Kept / prompt tokens per compacted request.", ["policy"],
            buckets=KEPT_RATIO_BUCKETS,
        )
        self.hits = Counter("vllm_kvevict:selection_cache_hits", "Selections reused from the "
                            "selection cache (one per layer and query piece).", ["policy"])
        self.misses = Counter("vllm_kvevict:selection_cache_misses", "Selections computed "
                              "(selection-cache misses, one per layer and query piece).", ["policy"])
        self.selected = Histogram("vllm_kvevict:selected_tokens", "Tokens a selecting request attended to "
                                  "in one step (mean over layers).", ["policy"], buckets=SELECTED_BUCKETS)
        self.compaction_time = Histogram("vllm_kvevict:compaction_seconds", "Worker time of one request's "
                                         "compaction: scoring, selection and moving KV over all layers.", ["policy"],
                                         buckets=COMPACTION_BUCKETS)
        self.kv_tokens = Gauge("vllm_kvevict:kv_cache_tokens", "KV tokens of running requests: logical positions, "
                               "or physical slots the cache holds after compaction.", ["policy", "kind"])
        self.info = Gauge("vllm_kvevict:policy_info", "The server-wide KV policy and budget (value is always 1).",
                          ["policy", "budget"])
        self._kv_seen: set[str] = set()
        self._initialize_children()

    def _initialize_children(self) -> None:
        """Create every policy's series at 0 up front (Prometheus practice for known label values):
        a counter born at its first event hides that event from rate() and increase(), so the first
        request a policy compacts would never show on a dashboard or in a load report."""
        from vllm_kvevict.policies.registry import POLICIES

        for name, spec in POLICIES.items():
            if spec.kind == "evict":
                for metric in (self.evicted, self.freed, self.compactions, self.kept_ratio, self.compaction_time):
                    metric.labels(name)
            elif spec.kind == "select":
                for metric in (self.hits, self.misses, self.selected):
                    metric.labels(name)

    def set_info(self, policy: str, budget: Any) -> None:
        self.info.labels(policy, "" if budget is None else str(budget)).set(1)

    @classmethod
    def get(cls) -> PromMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def observe(self, events: dict[str, Any]) -> None:
        for policy, seconds in events.get("compaction_s", ()):
            self.compaction_time.labels(policy).observe(seconds)
        snapshot = events.get("kv_tokens")
        if snapshot is not None:
            for policy in self._kv_seen | set(snapshot):  # a policy with no running request drops to 0
                logical, physical = snapshot.get(policy, (0, 0))
                self.kv_tokens.labels(policy, "logical").set(logical)
                self.kv_tokens.labels(policy, "physical").set(physical)
            self._kv_seen |= set(snapshot)
        for policy, hits, misses, selected in events.get("selection", ()):
            self.hits.labels(policy).inc(hits)
            self.misses.labels(policy).inc(misses)
            for n in selected:
                self.selected.labels(policy).observe(n)
        for policy, evicted, freed, ratio in events.get("compactions", ()):
            self.evicted.labels(policy).inc(evicted)
            self.freed.labels(policy).inc(freed)
            self.compactions.labels(policy).inc()
            if ratio is not None:
                self.kept_ratio.labels(policy).observe(ratio)


def install() -> None:
    """Front end: wrap StatLoggerManager.record to export our events and hide them from vLLM's loggers."""
    from vllm.v1.metrics.loggers import StatLoggerManager

    original = StatLoggerManager.record
    if getattr(original, _MARK, False):
        return

    def record(self, scheduler_stats, *args, **kwargs):
        events = take(scheduler_stats)
        if events:
            PromMetrics.get().observe(events)
        return original(self, scheduler_stats, *args, **kwargs)

    original_init = StatLoggerManager.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        from vllm_kvevict.core.requests import server_config

        config = server_config(vllm_config.additional_config)
        PromMetrics.get().set_info(config.policy, config.budget)

    setattr(record, _MARK, True)
    StatLoggerManager.record = record
    StatLoggerManager.__init__ = __init__
