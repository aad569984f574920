"""Per-request state the eviction core keeps on a worker between steps, and what it reports.

One `WorkerState` per worker thread (`worker_state()`), holding:

    queries     (request, layer) -> window queries captured while the prompt is prefilled, until compacted
    scores      (request, layer) -> per-token scores of a PRE_ROPE_QKV policy: the kept region's, and
                those computed since the last compaction
    lanes       request -> head-lane map of every layer [L, 2, H_kv] (start lane, length per head)
    selections  the selection cache of selecting policies, per (request, layer)
    report      what this worker ships to the scheduler each step (selection counts, compaction times)
    kept        (off by default) the logical positions every compaction kept, per (request, layer, head)
    step, qkv   this step's StepContext, and the pre-RoPE q/k/v captured per layer for it
    due         request -> the compaction a step's row reached, run before the next forward (`compact_due`)
    fresh_rows  requests whose first compaction writes into fresh blocks (copy-on-compact)

A request's entries go when vLLM reports it finished or aborted (`purge`; a compaction still due is
dropped: nothing reads that KV again); queries and scores restart when its prefill starts again from
position 0 (preemption recomputes it). Nothing here imports vLLM.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from vllm_kvevict.core.step import RowInfo, StepContext
from vllm_kvevict.paged.lanes import LaneMap
from vllm_kvevict.policies.soft_vote import SelectionCache


class _PerRequestLayer:
    """A store keyed by (request, layer)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, int], object] = {}

    def restart(self, req_id: str, layer: int) -> None:
        self._items.pop((req_id, layer), None)

    def purge(self, req_ids) -> None:
        gone = set(req_ids)
        if gone:
            for key in [k for k in self._items if k[0] in gone]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class QueryStore(_PerRequestLayer):
    """(request, layer) -> [(first position, queries [n, H_q, D])]; popped by the compaction."""

    def add(self, req_id: str, layer: int, first: int, rows: torch.Tensor) -> None:
        self._items.setdefault((req_id, layer), []).append((first, rows))

    def pop(self, req_id: str, layer: int) -> list[tuple[int, torch.Tensor]]:
        return self._items.pop((req_id, layer), [])


class ScoreStore(_PerRequestLayer):
    """(request, layer) -> [scores of the kept region [H_kv, n] or None, [(first logical position,
    scores [H_kv, m]) of tokens computed since the last compaction]]."""

    def add(self, req_id: str, layer: int, first: int, scores: torch.Tensor) -> None:
        self._items.setdefault((req_id, layer), [None, []])[1].append((first, scores))

    def take(self, req_id: str, layer: int) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        """The kept region's scores and the pending ones (which are cleared)."""
        entry = self._items.setdefault((req_id, layer), [None, []])
        pending, entry[1] = entry[1], []
        return entry[0], pending

    def keep(self, req_id: str, layer: int, scores: torch.Tensor) -> None:
        self._items.setdefault((req_id, layer), [None, []])[0] = scores


class LaneStore:
    """request -> int32 [num_layers, 2, H_kv]: each layer's (start lane, length) per KV head, written by
    the layer's compaction and read by attention every later step (one tensor per request, so a step
    stacks its rows once, not once per layer)."""

    def __init__(self) -> None:
        self._items: dict[str, torch.Tensor] = {}

    def put(self, req_id: str, layer: int, lanes: LaneMap, num_layers: int, device: torch.device) -> None:
        maps = self._items.get(req_id)
        if maps is None or maps.shape[0] != num_layers or maps.shape[2] != lanes.num_heads:
            maps = self._items[req_id] = torch.zeros(num_layers, 2, lanes.num_heads, dtype=torch.int32, device=device)
        maps[layer] = torch.tensor([lanes.starts, lanes.lengths], dtype=torch.int32)

    def stacked(self, req_ids: list[str]) -> torch.Tensor:
        """[len(req_ids), num_layers, 2, H_kv] for requests whose every layer was compacted."""
        missing = [r for r in req_ids if r not in self._items]
        if missing:
            raise RuntimeError(f"no head-lane map for compacted request(s) {missing}")
        return torch.stack([self._items[r] for r in req_ids])

    def get(self, req_id: str) -> torch.Tensor | None:
        return self._items.get(req_id)

    def purge(self, req_ids) -> None:
        for req_id in req_ids:
            self._items.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._items)


class KeptLog:
    """(request, layer) -> the logical positions each KV head keeps after its latest compaction (a list of
    sorted int64 tensors, ragged for head-lanes). Off unless a caller sets `WorkerState.kept` (tests, the
    oracle that rebuilds attention masks); compaction then records what it kept, on the host, and the
    entries stay until the caller drops them (`purge`), finished requests' included."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, int], list[torch.Tensor]] = {}

    def record(self, req_id: str, layer: int, physical: list[torch.Tensor], kept_tokens: int, new_start: int,
               first: bool) -> None:
        """`physical`: each head's kept positions in the layout compacted from; positions below
        `kept_tokens` are the previous kept region (unless `first`), the rest start at logical `new_start`."""
        physical = [p.detach().cpu().long() for p in physical]
        if first:
            self.items[(req_id, layer)] = physical
            return
        before = self.items[(req_id, layer)]
        self.items[(req_id, layer)] = [
            torch.where(p < kept_tokens, before[h][p.clamp(max=max(0, before[h].numel() - 1))], new_start + p - kept_tokens)
            for h, p in enumerate(physical)]

    def purge(self, req_ids) -> None:
        gone = set(req_ids)
        for key in [k for k in self.items if k[0] in gone]:
            del self.items[key]


class WorkerReport:
    """What the scheduler exports from this worker: selection hits, misses and selected tokens per request
    and step, and the time each request's compaction took (summed over layers). Drained once per step."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # policy -> [hits, misses]
        self._selected: dict[tuple[str, str], list[int]] = {}  # (policy, request) -> [sum over layers, layers]
        self._compaction_s: dict[tuple[str, str], float] = {}  # (policy, request) -> seconds this step

    def record_compaction(self, policy: str, req_id: str, seconds: float) -> None:
        key = (policy, req_id)
        self._compaction_s[key] = self._compaction_s.get(key, 0.0) + seconds

    def record_selection(self, policy: str, req_id: str, hit: bool, selected: int | torch.Tensor) -> None:
        """One selection; `selected` may be a device scalar (read once per step, in `drain`)."""
        counts = self._counts.setdefault(policy, [0, 0])
        counts[0 if hit else 1] += 1
        acc = self._selected.setdefault((policy, req_id), [0, 0])
        acc[0] = acc[0] + selected
        acc[1] += 1

    def drain(self) -> dict[str, list[list]]:
        """{"selection": [[policy, hits, misses, [mean selected tokens of each request, ...]], ...],
        "compaction_s": [[policy, seconds], ...]}, each key only when it has entries."""
        out: dict[str, list[list]] = {}
        totals = [total for total, _ in self._selected.values()]
        on_device = [t for t in totals if isinstance(t, torch.Tensor)]
        if on_device:  # one host read for the whole step
            values = iter(torch.stack([t.reshape(()) for t in on_device]).tolist())
            totals = [next(values) if isinstance(t, torch.Tensor) else t for t in totals]
        sums = {key: float(total) for key, total in zip(self._selected, totals)}
        for policy, (hits, misses) in self._counts.items():
            sizes = [sums[(p, r)] / layers for (p, r), (_, layers) in self._selected.items() if p == policy]
            out.setdefault("selection", []).append([policy, hits, misses, sizes])
        if self._compaction_s:
            out["compaction_s"] = [[policy, seconds] for (policy, _), seconds in self._compaction_s.items()]
        self._counts, self._selected, self._compaction_s = {}, {}, {}
        return out


@dataclass(frozen=True)
class DueCompaction:
    """A compaction point a row reached in a step: the row as it was then, and its logical block row."""

    row: RowInfo
    table: torch.Tensor


@dataclass
class WorkerState:
    queries: QueryStore = field(default_factory=QueryStore)
    scores: ScoreStore = field(default_factory=ScoreStore)
    lanes: LaneStore = field(default_factory=LaneStore)
    selections: SelectionCache = field(default_factory=lambda: SelectionCache(threshold=0.9))  # per-lookup threshold
    report: WorkerReport = field(default_factory=WorkerReport)
    step: StepContext | None = None
    qkv: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> this step's pre-RoPE q/k/v rows
    kept: KeptLog | None = None  # set it to record what every compaction keeps
    due: dict[str, DueCompaction] = field(default_factory=dict)  # run before the next forward (`compact_due`)
    fresh_rows: set[str] = field(default_factory=set)  # compacting into fresh blocks: the integration moves
    # them to the front of the request's row before the next step (`Compaction.copied_row`)

    def restart(self, req_id: str, layer: int) -> None:
        """A fresh (or recomputed) prefill of the request: forget what the layer captured before."""
        self.queries.restart(req_id, layer)
        self.scores.restart(req_id, layer)

    def purge(self, finished, preempted=()) -> None:
        """Finished or aborted requests leave nothing; preempted ones select afresh when recomputed, and
        capture their window queries and scores afresh (with a prefix-cache hit the recompute does not
        start at position 0, where `restart` would drop them)."""
        for store in (self.queries, self.scores, self.lanes):
            store.purge(finished)
        self.queries.purge(preempted)
        self.scores.purge(preempted)
        for req_id in (*finished, *preempted):
            self.selections.drop(req_id)
            self.fresh_rows.discard(req_id)
            self.due.pop(req_id, None)


_local = threading.local()


def worker_state() -> WorkerState:
    state = getattr(_local, "state", None)
    if state is None:
        state = _local.state = WorkerState()
    return state
