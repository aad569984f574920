"""Worker side: tell the eviction core which request each batch row is, every step.

vLLM's attention metadata carries tensors, not request ids. Our worker wraps its own model runner's
`_build_attention_metadata` (an instance attribute, not a class patch) to publish a `StepContext` just
before the metadata builders run: per row, the request id, tokens computed before this step, tokens
scheduled, prompt length and the request's plan (from a `PlanBook`: worked out once per request). The
builder and the attention impl read it in the same process and the same step. Just before that, the
compactions the previous step's rows reached run over every attention layer's cache (`compact_due`).
Finished and aborted requests are forgotten when vLLM says so.
"""

from __future__ import annotations

import copy

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker as GPUWorker

from vllm_kvevict.core.compaction import compact_due
from vllm_kvevict.core.requests import PlanBook, server_config
from vllm_kvevict.core.state import worker_state
from vllm_kvevict.core.step import RowInfo, StepContext
from vllm_kvevict.integration.vllm.backend import EvictionImplMixin
from vllm_kvevict.integration.vllm.metrics import REPORT_ATTR


def publish_step(runner, num_reqs: int) -> StepContext:
    """Build and publish the StepContext from the runner's persistent batch."""
    plans: PlanBook = runner._kvevict_plans
    batch = runner.input_batch
    query_start = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
    computed = batch.num_computed_tokens_cpu
    num_blocks = batch.block_table.block_tables[0].num_blocks_per_row
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        params = runner.requests[req_id].sampling_params
        prompt_len = int(batch.num_prompt_tokens[i])
        plan = plans.get(req_id, params.extra_args if params is not None else None, prompt_len)
        rows.append(RowInfo(req_id, int(computed[i]), query_start[i + 1] - query_start[i], prompt_len, plan,
                            int(num_blocks[i])))
    step = StepContext(tuple(rows), plans.num_layers)
    worker_state().step = step
    return step


def instrument_runner(runner, vllm_config) -> None:
    """Wrap this runner's metadata construction so each step publishes its StepContext."""
    if getattr(runner, "_kvevict_instrumented", False):
        return
    runner._kvevict_plans = PlanBook(server_config(vllm_config.additional_config), vllm_config.cache_config.block_size,
                                     vllm_config.model_config.get_total_num_hidden_layers(),  # global ids under PP
                                     copy_on_compact=bool(vllm_config.cache_config.enable_prefix_caching))
    original_build = runner._build_attention_metadata
    original_update = runner._update_states

    def build_attention_metadata(num_tokens, num_reqs, *args, **kwargs):
        # before this step's forward writes anything: the compactions the last step's rows reached
        compact_due(worker_state(), eviction_layers(runner), runner._kvevict_plans.num_layers)
        publish_step(runner, num_reqs)
        return original_build(num_tokens, num_reqs, *args, **kwargs)

    def update_states(scheduler_output, *args, **kwargs):
        finished = scheduler_output.finished_req_ids  # finished or aborted
        worker_state().purge(finished, scheduler_output.preempted_req_ids or ())
        runner._kvevict_plans.forget(finished)
        move_fresh_blocks(runner)
        return original_update(scheduler_output, *args, **kwargs)

    runner._build_attention_metadata = build_attention_metadata
    runner._update_states = update_states
    runner._kvevict_instrumented = True


def eviction_layers(runner):
    """(LayerEviction, KV cache tensor) of every attention layer of this worker that runs the core; a
    generator, so a step with no compaction due (`compact_due` returns first) walks no layer."""
    layers = getattr(runner, "_kvevict_layers", None)
    if layers is None:
        layers = runner._kvevict_layers = [
            layer for layer in runner.compilation_config.static_forward_context.values()
            if isinstance(getattr(layer, "impl", None), EvictionImplMixin)]
    for layer in layers:
        yield layer.impl.eviction(layer), layer.kv_cache


def move_fresh_blocks(runner) -> None:
    """Copy-on-compact: the requests whose first compaction wrote into fresh blocks last step get the row
    the scheduler gave them meanwhile (`Compaction.copied_row`). vLLM's runner only appends block ids to a
    running request's row, so the row is rewritten here: in the request's state (what a request that
    rejoins the batch is rebuilt from) and in the persistent batch's block table."""
    state = worker_state()
    batch = runner.input_batch
    for req_id in state.fresh_rows:
        req = runner.requests.get(req_id)
        if req is None:
            continue
        comp = runner._kvevict_plans.get(req_id, req.sampling_params.extra_args if req.sampling_params else None,
                                         req.num_prompt_tokens).compaction
        moved, _ = comp.copied_row(req.block_ids[0], 0)  # freed slots never read again; vLLM's null block is 0
        req.block_ids = (moved, *req.block_ids[1:])
        index = batch.req_id_to_index.get(req_id)
        if index is not None:
            batch.block_table.add_row(req.block_ids, index)
    state.fresh_rows.clear()


def capture_qkv(model) -> int:
    """Hook every decoder layer's fused q/k/v projection, for policies that score pre-RoPE q/k/v.

    vLLM applies RoPE to q and k in place after the projection (CPU `ops.rotary_embedding`), so the
    hook keeps a copy, and only in steps where some request needs it. Returns how many layers were hooked."""
    from vllm.model_executor.models.utils import extract_layer_index

    hooked = 0
    for name, module in model.named_modules():
        if not name.endswith("self_attn.qkv_proj"):
            continue
        layer = extract_layer_index(name)

        def hook(_module, _inputs, output, layer=layer):
            state = worker_state()
            if state.step is not None and state.step.needs_qkv:
                qkv = output[0] if isinstance(output, tuple) else output
                state.qkv[layer] = qkv.detach().clone()

        module.register_forward_hook(hook)
        hooked += 1
    return hooked


class EvictionWorkerMixin:
    """What our workers add to vLLM's: a runner that publishes a StepContext each step, q/k/v hooks,
    and the worker report on every ModelRunnerOutput."""

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


class KVEvictCPUWorker(EvictionWorkerMixin, CPUWorker):
    """vLLM's CPU worker with the eviction core."""


class KVEvictGPUWorker(EvictionWorkerMixin, GPUWorker):
    """vLLM's GPU worker (V1 model runner) with the eviction core."""


def _with_worker_report(output):
    if isinstance(output, ModelRunnerOutput):
        report = worker_state().report.drain()
        if report:
            if output is EMPTY_MODEL_RUNNER_OUTPUT:  # vLLM's shared instance: never tag it
                output = copy.copy(output)
            setattr(output, REPORT_ATTR, report)
    return output
