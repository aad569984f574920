"""Worker side: tell the attention backend which request each batch row is, every step.

vLLM's attention metadata carries tensors, not request ids. Our worker wraps its own model runner's
`_build_attention_metadata` (an instance attribute, not a class patch) to publish a `StepContext`
just before the metadata builders run: per row, the request id, tokens computed before this step,
tokens scheduled, prompt length and the request's policy plan. The builder and the attention impl
read it in the same process and the same step.
"""

from __future__ import annotations

import copy
import functools
import threading
from dataclasses import dataclass

import torch

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvevict.integration.vllm.settings import RequestPlan, request_plan, server_config
from vllm_kvevict.policies.tokenselect import SelectionCache

#: ModelRunnerOutput attribute carrying this step's worker report (TokenSelect counts, compaction times)
#: to the scheduler (the MP executor pickles the object whole, so an attribute survives; the scheduler
#: reads it in update_from_output).
REPORT_ATTR = "kvevict_report"


@dataclass(frozen=True)
class RowInfo:
    req_id: str
    num_computed: int  # tokens whose KV existed before this step
    num_scheduled: int  # tokens computed in this step
    prompt_len: int
    plan: RequestPlan

    @property
    def epoch(self) -> int:
        """The layout attention reads this step (-1: logical, not compacted yet)."""
        comp = self.plan.compaction
        return -1 if comp is None else comp.epoch(self.num_computed)

    @property
    def compacted(self) -> bool:
        """Compaction already happened: attention must read the physical layout."""
        return self.epoch >= 0

    @property
    def target(self) -> int | None:
        """The next compaction point (the prompt's end, then decode-time points); None if there is none."""
        comp = self.plan.compaction
        return None if comp is None else comp.next_point(self.num_computed)

    @functools.cached_property  # asked by the builder and by every layer's attention in the step
    def selects(self) -> bool:
        """A TokenSelect request with at least one query piece this step whose context selects."""
        return self.plan.config.kind == "select" and self.plan.policy.selects_within(
            self.num_computed, self.num_computed + self.num_scheduled)

    @property
    def scores_qkv(self) -> bool:
        """This step's tokens get scored from their pre-RoPE q/k/v (some will be compacted later)."""
        return self.target is not None and self.plan.policy.needs_qkv

    @property
    def reaches_point(self) -> bool:
        """This step writes the KV at the compaction point: compact after its attention."""
        target = self.target
        return target is not None and self.num_computed < target <= self.num_computed + self.num_scheduled


@dataclass(frozen=True)
class StepContext:
    rows: tuple[RowInfo, ...]
    num_layers: int

    @property
    def active(self) -> bool:
        return any((r.plan.compaction is not None and not r.plan.compaction.is_noop) or r.selects for r in self.rows)

    @functools.cached_property  # asked by every layer's q/k/v hook in the step
    def needs_qkv(self) -> bool:
        """Some row scores this step's tokens from their pre-RoPE q/k/v (Locret before its last point)."""
        return any(r.scores_qkv for r in self.rows)


class _PerRequestLayer:
    """A worker-thread store keyed by (request, layer), emptied per layer when the request's prefill
    restarts (preemption + recompute) and per request when vLLM reports it finished or aborted."""

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
    """Queries captured for prompts still being prefilled: (request, layer) -> [(first position, [n, H, D])].
    Entries also go when the prompt is compacted."""

    def add(self, req_id: str, layer: int, first: int, rows: torch.Tensor) -> None:
        self._items.setdefault((req_id, layer), []).append((first, rows))

    def pop(self, req_id: str, layer: int) -> list[tuple[int, torch.Tensor]]:
        return self._items.pop((req_id, layer), [])


class LaneStore(_PerRequestLayer):
    """Head-lane maps of requests compacted in the ragged layout: (request, layer) -> LaneMap.
    Written by the compaction, read by attention every later step."""

    def put(self, req_id: str, layer: int, lanes) -> None:
        self._items[(req_id, layer)] = lanes

    def get(self, req_id: str, layer: int):
        return self._items.get((req_id, layer))


class ScoreStore(_PerRequestLayer):
    """Per-chunk eviction (Locret): (request, layer) -> [scores of the kept region [H_kv, n] or None,
    [(first logical position, scores [H_kv, m]) of tokens computed since the last compaction]]."""

    def add(self, req_id: str, layer: int, first: int, scores: torch.Tensor) -> None:
        self._items.setdefault((req_id, layer), [None, []])[1].append((first, scores))

    def take(self, req_id: str, layer: int) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        """The kept region's scores and the pending ones (which are cleared)."""
        entry = self._items.setdefault((req_id, layer), [None, []])
        pending, entry[1] = entry[1], []
        return entry[0], pending

    def keep(self, req_id: str, layer: int, scores: torch.Tensor) -> None:
        self._items.setdefault((req_id, layer), [None, []])[0] = scores


class SelectionStore:
    """TokenSelect state of this worker (the selection cache per (request, layer)) and what the scheduler
    exports from this worker: selection hits, misses and selected tokens per request and step, and the
    time each request's compaction took (summed over layers). Drained once per step."""

    def __init__(self) -> None:
        self.cache = SelectionCache(threshold=0.9)  # each lookup passes its request's own threshold
        self._counts: dict[str, list[int]] = {}  # policy -> [hits, misses]
        self._selected: dict[tuple[str, str], list[int]] = {}  # (policy, request) -> [sum over layers, layers]
        self._compaction_s: dict[tuple[str, str], float] = {}  # (policy, request) -> seconds this step

    def record_compaction(self, policy: str, req_id: str, seconds: float) -> None:
        key = (policy, req_id)
        self._compaction_s[key] = self._compaction_s.get(key, 0.0) + seconds

    def record(self, policy: str, req_id: str, hit: bool, selected: int) -> None:
        counts = self._counts.setdefault(policy, [0, 0])
        counts[0 if hit else 1] += 1
        acc = self._selected.setdefault((policy, req_id), [0, 0])
        acc[0] += selected
        acc[1] += 1

    def drain(self) -> dict[str, list[list]]:
        """{"selection": [[policy, hits, misses, [mean selected tokens of each request, ...]], ...],
        "compaction_s": [[policy, seconds], ...]}, each key only when it has entries."""
        out: dict[str, list[list]] = {}
        for policy, (hits, misses) in self._counts.items():
            sizes = [total / layers for (p, _), (total, layers) in self._selected.items() if p == policy]
            out.setdefault("selection", []).append([policy, hits, misses, sizes])
        if self._compaction_s:
            out["compaction_s"] = [[policy, seconds] for (policy, _), seconds in self._compaction_s.items()]
        self._counts, self._selected, self._compaction_s = {}, {}, {}
        return out

    def purge(self, req_ids) -> None:
        for rid in set(req_ids):
            self.cache.drop(rid)


_local = threading.local()


def _store(name: str, cls):
    store = getattr(_local, name, None)
    if store is None:
        store = cls()
        setattr(_local, name, store)
    return store


def lane_store() -> LaneStore:
    return _store("lanes", LaneStore)


def selection_store() -> SelectionStore:
    return _store("selection", SelectionStore)


def query_store() -> QueryStore:
    return _store("queries", QueryStore)


def score_store() -> ScoreStore:
    return _store("scores", ScoreStore)


def qkv_captures() -> dict[int, torch.Tensor]:
    """Layer -> this step's pre-RoPE q/k/v rows [num_tokens, (H_q + 2 H_kv) * d], captured by the hook
    on the layer's fused qkv projection (`capture_qkv`) when some row of the step needs them."""
    return _store("qkv", dict)


def current_step() -> StepContext | None:
    return getattr(_local, "step", None)


def set_step(step: StepContext | None) -> None:
    _local.step = step


def publish_step(runner, num_reqs: int, block_size: int, num_layers: int) -> StepContext:
    """Build and publish the StepContext from the runner's persistent batch."""
    server = runner._kvevict_server_config
    batch = runner.input_batch
    query_start = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests[req_id]
        params = state.sampling_params
        prompt_len = int(batch.num_prompt_tokens[i])
        extra = params.extra_args if params is not None else None
        rows.append(
            RowInfo(
                req_id=req_id,
                num_computed=int(batch.num_computed_tokens_cpu[i]),
                num_scheduled=query_start[i + 1] - query_start[i],
                prompt_len=prompt_len,
                plan=request_plan(server, extra, prompt_len, block_size, num_layers),
            )
        )
    step = StepContext(tuple(rows), num_layers)
    set_step(step)
    return step


def instrument_runner(runner, vllm_config) -> None:
    """Wrap this runner's metadata construction so each step publishes its StepContext."""
    if getattr(runner, "_kvevict_instrumented", False):
        return
    runner._kvevict_server_config = server_config(vllm_config.additional_config)
    block_size = vllm_config.cache_config.block_size
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()  # layer ids are global under PP
    original_build = runner._build_attention_metadata
    original_update = runner._update_states

    def build_attention_metadata(num_tokens, num_reqs, *args, **kwargs):
        publish_step(runner, num_reqs, block_size, num_layers)
        return original_build(num_tokens, num_reqs, *args, **kwargs)

    def update_states(scheduler_output, *args, **kwargs):
        query_store().purge(scheduler_output.finished_req_ids)  # finished or aborted
        score_store().purge(scheduler_output.finished_req_ids)
        lane_store().purge(scheduler_output.finished_req_ids)
        selection_store().purge(scheduler_output.finished_req_ids)
        selection_store().purge(scheduler_output.preempted_req_ids or ())  # recomputed: select afresh
        return original_update(scheduler_output, *args, **kwargs)

    runner._build_attention_metadata = build_attention_metadata
    runner._update_states = update_states
    runner._kvevict_instrumented = True


def capture_qkv(model) -> int:
    """Hook every decoder layer's fused q/k/v projection so Locret's heads can read the pre-RoPE q/k/v.

    The projection's output is what the retaining heads were trained on (cat(q_proj, k_proj, v_proj));
    vLLM then applies RoPE to q and k in place (CPU `ops.rotary_embedding`), so the hook keeps a copy,
    and only in steps where some request needs it. Returns how many layers were hooked."""
    from vllm.model_executor.models.utils import extract_layer_index

    hooked = 0
    for name, module in model.named_modules():
        if not name.endswith("self_attn.qkv_proj"):
            continue
        layer = extract_layer_index(name)

        def hook(_module, _inputs, output, layer=layer):
            step = current_step()
            if step is not None and step.needs_qkv:
                qkv = output[0] if isinstance(output, tuple) else output
                qkv_captures()[layer] = qkv.detach().clone()

        module.register_forward_hook(hook)
        hooked += 1
    return hooked


class KVEvictCPUWorker(CPUWorker):
    """vLLM's CPU worker whose model runner publishes a StepContext each step."""

    def init_device(self):
        super().init_device()
        instrument_runner(self.model_runner, self.vllm_config)

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self.model_runner._kvevict_qkv_layers = capture_qkv(self.model_runner.get_model())

    def execute_model(self, *args, **kwargs):
        return _with_worker_report(super().execute_model(*args, **kwargs))

    def sample_tokens(self, *args, **kwargs):
        return _with_worker_report(super().sample_tokens(*args, **kwargs))


def _with_worker_report(output):
    if isinstance(output, ModelRunnerOutput):
        report = selection_store().drain()
        if report:
            if output is EMPTY_MODEL_RUNNER_OUTPUT:  # vLLM's shared instance: never tag it
                output = copy.copy(output)
            setattr(output, REPORT_ATTR, report)
    return output
