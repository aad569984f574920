"""One engine run in a fresh process, through the CPU path or the Triton path; JSON spec on stdin, a JSON
report on the last stdout line. Used to compare the two paths request by request.

spec: {"path": "cpu" | "triton" | "stock-triton", "model": DIR, "engine": {LLM kwargs},
       "requests": [{"id", "prompt", "max_tokens", "xargs", "logprobs", "after"}] ("after": an id; the request
       is submitted when that one finishes), "abort": [id, ...] (aborted after step 2),
       "preempt_after": k (every running request is preempted after step k, and recomputed)}

    cpu           our backend on CPU_ATTN (torch twins)
    triton        our backend on TRITON_ATTN (our Triton kernels): on a CPU under the interpreter
                  (VLLM_KVEVICT_BACKEND=triton), on a GPU natively
    stock-triton  vLLM's own TRITON_ATTN, our plugin not loaded (on a CPU: in the CPU_ATTN slot)

report: {"outputs": {id: token ids}, "held": {id: [real blocks held after each step]}, "free": [free blocks
         before, after], "kept": {id: {layer: [[positions] per KV head]}}, "picked": {id: {layer: [positions]}},
         "selection": [hits, misses], "backend": class path of the attention backend in use, "cached": {id:
         prompt tokens read from the prefix cache},
         "logprobs": {id: [{token id: logprob} per generated token]} and "prompt_ids": {id: the prompt's token
         ids as vLLM tokenised it} for requests that ask for "logprobs": N}
"""

import json
import os
import sys


def main() -> None:
    import torch

    spec = json.loads(sys.stdin.read())
    path = spec["path"]
    gpu = torch.cuda.is_available()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: inspectable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the VM's NUMA report fails vLLM's memory check
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ["VLLM_KVEVICT_BACKEND"] = "triton" if path != "cpu" and not gpu else "auto"
    if path != "cpu" and not gpu:
        from vllm_kvevict.integration.vllm.triton_on_cpu import install

        install()
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    slot = AttentionBackendEnum.TRITON_ATTN if gpu else AttentionBackendEnum.CPU_ATTN
    engine_args = dict(spec["engine"])
    if path == "stock-triton":
        if gpu:
            engine_args["attention_backend"] = "TRITON_ATTN"
        else:
            register_backend(slot, "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend")
    llm = LLM(spec["model"], **engine_args)
    backend = slot.get_path()
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    state = None
    if path != "stock-triton":
        from vllm_kvevict.core.state import KeptLog, worker_state

        state = worker_state()
        state.kept = KeptLog()
    report = {"backend": backend, "outputs": {}, "held": {}, "free": [pool.get_num_free_blocks()]}
    ids = {}

    def submit(r) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], extra_args=r.get("xargs") or None,
                                logprobs=r.get("logprobs"))
        ids[engine.add_request(r["id"], r["prompt"], params)] = r["id"]
        report["held"][r["id"]] = []

    for r in spec["requests"]:
        if "after" not in r:
            submit(r)
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                name = ids.get(out.request_id, out.request_id)
                report["outputs"][name] = list(out.outputs[0].token_ids)
                report.setdefault("cached", {})[name] = out.num_cached_tokens
                for r in spec["requests"]:
                    if r.get("after") == name:
                        submit(r)
                if out.outputs[0].logprobs is not None:
                    report.setdefault("prompt_ids", {})[name] = list(out.prompt_token_ids)
                    report.setdefault("logprobs", {})[name] = [
                        {str(t): lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs]
        steps += 1
        if steps == 2 and spec.get("abort"):
            engine.abort_request(list(spec["abort"]))
        if steps == spec.get("preempt_after"):
            report["preempted"] = len(sched.running)
            assert sched.reset_prefix_cache(reset_running_requests=True)
        for rid, name in ids.items():
            blocks = manager.req_to_blocks.get(rid)
            if blocks is not None:
                report["held"][name].append(sum(1 for b in blocks if not b.is_null))
        if state is not None:  # read before vLLM reports a finished request to the worker
            _collect(report, state, ids)
    report["free"].append(pool.get_num_free_blocks())
    if state is not None:
        report["selection"] = [sum(sched.kv_counters.selection_hits.values()),
                               sum(sched.kv_counters.selection_misses.values())]
    print(json.dumps(report))


def _collect(report, state, ids) -> None:
    kept = report.setdefault("kept", {})
    for (rid, layer), heads in state.kept.items.items():
        kept.setdefault(ids.get(rid, rid), {})[str(layer)] = [h.tolist() for h in heads]
    picked = report.setdefault("picked", {})
    for key, (_fingerprint, positions) in state.selections.entries.items():
        rid, layer = key
        picked.setdefault(ids.get(rid, rid), {})[str(layer)] = positions.tolist()


if __name__ == "__main__":
    main()
