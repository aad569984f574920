"""`vllm-kvevict bench capacity`: what eviction buys under memory pressure, side by side in one run.

One engine with a fixed, small KV pool. For `none` and then each policy, `requests` prompts of
`prompt_len` tokens (distinct natural-text prompts, the same set for every policy) are submitted at
once and run to `max_tokens` output tokens each (EOS ignored, so every policy does the same work).
The engine is stepped here (in-process engine core), so every step can read the scheduler:

    blocks_per_request   real blocks a request holds on its last decode step, mean over requests
    peak_running         most requests in the scheduler's running queue after any step
    output_tok_s         output tokens / wall time of the phase (prefill included)
    ttft_*               submission -> first output token (queueing included), p50 / p95
    itl_*                time between a request's consecutive output tokens, p50 / p95
    compaction_s         worker time compacting (scoring, selection, moving KV; all requests, all layers)
    lone_ttft_s          TTFT of one request alone on the idle engine (median of 3): compaction's cost
    timeline             [seconds, running, waiting, KV blocks in use] after each step that changed them
    agreement            mean over requests of the fraction of `none`'s greedy output reproduced before
                         the first different token (same prompts, same engine)
    agreement_vs_no_interval   (rows with a decode interval) the same against the policy without one

With `decode_interval` N every evicting policy that offers it runs twice, without and with
`kv_decode_interval` N (the tail re-compacted every N generated tokens), so the memory it bounds and the
agreement it costs sit side by side.

Ratios are to `none` measured in the same run on the same engine. Eviction pays only when the pool
cannot hold every request's full prompt: pick `kv_blocks` so that `none` runs few at a time.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from vllm_kvevict.eval.engine import (
    check_policies, cpu_defaults, make_llm, policy_args, servable_policies, split_variant)
from vllm_kvevict.eval.scoring import prefix_agreement
from vllm_kvevict.policies.registry import get_spec


@dataclass
class CapacitySpec:
    policies: Sequence[str] | None = None  # None: every registered policy the engine can serve
    budget: int | float = 256
    kv_blocks: int = 48
    block_size: int = 128
    requests: int = 12
    prompt_len: int = 2048
    max_tokens: int = 128
    seed: int = 0
    decode_interval: int = 0  # > 0: evicting policies that offer it also run with this interval
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policies is None:
            self.policies = servable_policies()

    def validate(self) -> None:
        check_policies(self.policies, [self.budget])
        if self.block_size % 32:
            raise ValueError(f"block_size={self.block_size} must be a multiple of 32 (CPU attention)")
        need = math.ceil((self.prompt_len + self.max_tokens) / self.block_size)
        if self.kv_blocks <= need:
            raise ValueError(f"kv_blocks={self.kv_blocks} cannot hold one request ({need} blocks of "
                             f"{self.block_size} tokens for {self.prompt_len}+{self.max_tokens} tokens); use more")
        if self.decode_interval < 0:
            raise ValueError(f"decode_interval={self.decode_interval} must be >= 0 (0: off)")
        for name in ("requests", "prompt_len", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _prompts(tokenizer, spec: CapacitySpec) -> list[list[int]]:
    from vllm_kvevict.eval.tasks import hf_builder, make_sample

    builder = hf_builder(tokenizer)
    return [list(make_sample(builder, "agreement", spec.prompt_len, None, i, spec.seed).prompt_ids)
            for i in range(spec.requests)]


def run_phase(llm, prompts: list[list[int]], policy: str, budget, max_tokens: int, tag: str,
              decode_interval: int | None = None) -> dict[str, Any]:
    """Submit every prompt at once under (policy, budget[, decode_interval]), step to completion, measure.
    decode_interval None: the policy's own default; 0: explicitly none."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    sched = core.scheduler
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    extra = policy_args(policy, budget)
    if decode_interval is not None:
        extra["kv_decode_interval"] = decode_interval
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    pool = sched.kv_cache_manager.block_pool
    total_blocks = pool.get_num_free_blocks()
    counted_as = split_variant(policy)[0]  # the worker counts a variant under its policy's name
    compacting = sched.kv_counters.compaction_seconds.get(counted_as, 0.0)
    timeline: list[list[float]] = []
    start = time.perf_counter()
    names = [engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=p), params) for i, p in enumerate(prompts)]
    token_times: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    last_blocks: dict[str, int] = {}
    peak_running = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        peak_running = max(peak_running, len(sched.running))
        point = [len(sched.running), len(sched.waiting), total_blocks - pool.get_num_free_blocks()]
        if not timeline or timeline[-1][1:] != point:  # a step function: record the changes only
            timeline.append([round(now - start, 3), *point])
        for out in outputs:
            times = token_times.setdefault(out.request_id, [])
            times.extend([now] * (len(out.outputs[0].token_ids) - len(times)))
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        for rid, req in sched.requests.items():
            if req.num_output_tokens > 0:
                blocks = manager.req_to_blocks.get(rid, ())
                last_blocks[rid] = sum(1 for b in blocks if not b.is_null)
    wall = time.perf_counter() - start
    ttft = [t[0] - start for t in token_times.values() if t]
    itl = [b - a for t in token_times.values() for a, b in zip(t, t[1:])]
    n_out = sum(len(t) for t in token_times.values())
    if n_out != len(prompts) * max_tokens:
        raise RuntimeError(f"{policy}: {n_out} output tokens, expected {len(prompts) * max_tokens}")
    return {
        "blocks_per_request": sum(last_blocks.values()) / max(1, len(last_blocks)),
        "peak_running": peak_running,
        "output_tok_s": n_out / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "itl_p50_s": percentile(itl, 50), "itl_p95_s": percentile(itl, 95),
        "seconds": wall, "output_tokens": n_out,
        "compaction_s": sched.kv_counters.compaction_seconds.get(counted_as, 0.0) - compacting,
        "timeline": timeline,
        "tokens": [tokens.get(f"{tag}-{i}", []) for i in range(len(prompts))],  # per prompt (not saved)
    }


def lone_ttft(llm, prompt: list[int], policy: str, budget, repeats: int = 3) -> float:
    """TTFT of one request alone on the idle engine, median of `repeats` (what compaction adds to it)."""
    times = sorted(run_phase(llm, [prompt], policy, budget, 1, f"lone-{policy}-{k}")["ttft_p50_s"]
                   for k in range(repeats))
    return times[len(times) // 2]


def run(spec: CapacitySpec, model: str, progress: bool = True) -> dict[str, Any]:
    spec.validate()
    cpu_defaults()
    max_len = spec.block_size * math.ceil((spec.prompt_len + spec.max_tokens) / spec.block_size)
    llm = make_llm(model, max_model_len=max_len, block_size=spec.block_size, kv_blocks=spec.kv_blocks,
                   max_num_seqs=max(spec.requests, 1))
    prompts = _prompts(llm.get_tokenizer(), spec)
    run_phase(llm, prompts[:1], "none", None, 4, "warmup")  # first-call costs outside the measurement
    # with a decode interval to compare, "without" means explicitly none (vatp's default is 128)
    offers = [p for p in spec.policies if p != "none" and _interval_param(p) is not None]
    phases = [("none", None, None)] + [(p, spec.budget, 0 if spec.decode_interval and p in offers else None)
                                       for p in spec.policies if p != "none"]
    if spec.decode_interval:
        phases += [(p, spec.budget, spec.decode_interval) for p in offers]
    records = []
    bar = _progress(len(phases), progress)
    for policy, budget, interval in phases:
        lone = lone_ttft(llm, prompts[0], policy, budget)
        m = run_phase(llm, prompts, policy, budget, spec.max_tokens, f"{policy}-{interval}", interval)
        effective = interval if interval is not None else _default_interval(policy)
        records.append({"policy": policy, "budget": budget, "decode_interval": effective, "lone_ttft_s": lone, **m})
        bar(f"{policy}: {m['peak_running']} running, {m['output_tok_s']:.1f} tok/s")
    base = records[0]
    without = {rec["policy"]: rec["tokens"] for rec in records if not rec["decode_interval"]}
    for rec in records:
        rec["agreement"] = _agreement(base["tokens"], rec["tokens"])
        if rec["decode_interval"] and rec["policy"] in without:  # what re-compacting costs, same policy without
            rec["agreement_vs_no_interval"] = _agreement(without[rec["policy"]], rec["tokens"])
    for rec in records:
        del rec["tokens"]
        rec["ratio_vs_none"] = {
            "peak_running": rec["peak_running"] / base["peak_running"],
            "output_tok_s": rec["output_tok_s"] / base["output_tok_s"],
            "blocks_per_request": rec["blocks_per_request"] / base["blocks_per_request"],
            "lone_ttft_s": rec["lone_ttft_s"] / base["lone_ttft_s"],
            "itl_p50_s": rec["itl_p50_s"] / base["itl_p50_s"],
        }
    return {
        "model": model, "kv_blocks": spec.kv_blocks, "block_size": spec.block_size, "requests": spec.requests,
        "prompt_len": spec.prompt_len, "max_tokens": spec.max_tokens,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "spec": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(spec).items()},
        "records": records,
    }


def _interval_param(policy: str):
    return None if policy == "none" else get_spec(split_variant(policy)[0]).param("decode_interval")


def _default_interval(policy: str) -> int:
    """The interval a phase without an explicit one runs with: a variant's field, else the preset's."""
    param = _interval_param(policy)
    if param is None:
        return 0
    return int(split_variant(policy)[1].get("decode_interval", param.default))


def _agreement(reference: list[list[int]], outputs: list[list[int]]) -> float:
    """Mean over requests of the share of the reference output reproduced before the first difference."""
    return sum(prefix_agreement(ref, got, len(ref)) for ref, got in zip(reference, outputs)) / len(reference)


def _progress(total: int, enabled: bool):
    """A tqdm bar over phases (tqdm ships with vLLM); a no-op when disabled."""
    if not enabled:
        return lambda msg: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="capacity", unit="policy")

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step
