"""`vllm-kvevict eval`: quality under compression, measured through vLLM on the default model.

Every (policy, budget) of the grid runs the same prompts in one engine (one batch, one progress
bar); the full cache (`none`) is always included and is the reference of the `agreement` task.

Output contract (other tools read it; keys are only ever added):

    {"model": ..., "records": [{"policy", "budget", "context", "task", "accuracy", "n", "ci_low",
      "ci_high", ...}], "by_depth": [{... "depth", "accuracy", "n"}], ...}

`accuracy` is the fraction of samples answered fully (needle tasks), the fraction of the full
cache's first N greedy tokens reproduced (agreement), or the teacher-forced top-1 accuracy (ppl,
which also reports `perplexity`). `budget` is null for `none`.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from vllm_kvevict.eval import scoring
from vllm_kvevict.eval.engine import FORCE_KEY, check_policies, cpu_defaults, make_llm, policy_args, servable_policies
from vllm_kvevict.eval.tasks import NEEDLE_TASKS, TASKS, Sample, hf_builder, make_samples


@dataclass
class EvalSpec:
    policies: Sequence[str] | None = None  # None: every registered policy the engine can serve
    budgets: Sequence[int | float] = (128, 256, 512)
    contexts: Sequence[int] = (1024, 2048, 4096)
    tasks: Sequence[str] = TASKS
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    samples: int = 2  # per (task, context, depth)
    seed: int = 0
    agreement_tokens: int = 32
    kv_gib: float = 2.0
    # (policy, budget) pairs run only at these contexts; None: at every context (none runs everywhere)
    policy_contexts: Sequence[int] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policies is None:
            self.policies = servable_policies()

    def validate(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
        check_policies(self.policies, self.budgets)
        for context in self.contexts:
            if context < 256:
                raise ValueError(f"context {context} is too short; use at least 256 tokens")
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth {depth} must be in [0, 1]")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be >= 1")


@dataclass(frozen=True)
class Job:
    sample: Sample
    policy: str
    budget: int | float | None


def plan_jobs(spec: EvalSpec, samples: Sequence[Sample]) -> list[Job]:
    where = spec.policy_contexts
    # the full cache runs everywhere, except agreement's reference where no policy is compared with it
    jobs = [Job(s, "none", None) for s in samples if s.task != "agreement" or where is None or s.context in where]
    for policy in spec.policies:
        if policy == "none":
            continue
        for budget in spec.budgets:
            for s in samples:
                if where is None or s.context in where:
                    jobs.append(Job(s, policy, budget))
    return jobs


def sampling_params(job: Job):
    from vllm import SamplingParams

    extra = policy_args(job.policy, job.budget)
    sample = job.sample
    if sample.task == "ppl":
        extra[FORCE_KEY] = list(sample.continuation_ids)
        return SamplingParams(temperature=0.0, max_tokens=len(sample.continuation_ids), ignore_eos=True,
                              logprobs=1, extra_args=extra)
    return SamplingParams(temperature=0.0, max_tokens=sample.max_tokens, extra_args=extra)


def run(spec: EvalSpec, model: str, progress: bool = True) -> dict[str, Any]:
    """Run the grid; returns the result document (see the module docstring)."""
    spec.validate()
    cpu_defaults(spec.kv_gib)
    from vllm import TokensPrompt

    max_len = max(spec.contexts) + 80
    llm = make_llm(model, max_model_len=128 * math.ceil(max_len / 128), force_tokens=True)
    builder = hf_builder(llm.get_tokenizer())
    samples = make_samples(builder, spec.tasks, spec.contexts, spec.depths, spec.samples, spec.seed)
    jobs = plan_jobs(spec, samples)
    started = time.monotonic()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(j.sample.prompt_ids)) for j in jobs],
                           [sampling_params(j) for j in jobs], use_tqdm=progress)
    seconds = time.monotonic() - started
    results = [(job, out.outputs[0]) for job, out in zip(jobs, outputs)]
    doc = score(spec, results)
    doc.update(
        model=model, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=round(seconds, 1), requests=len(jobs), prompt_tokens=sum(len(j.sample.prompt_ids) for j in jobs),
        spec=spec_record(spec),
    )
    return doc


def spec_record(spec: EvalSpec) -> dict[str, Any]:
    """The grid as the result document records it (`spec`)."""
    return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(spec).items()}


def score(spec: EvalSpec, results: Sequence[tuple[Job, Any]]) -> dict[str, Any]:
    """Per-sample scores -> records (per policy x budget x context x task) and per-depth records.

    Each result's output needs `.text`, `.token_ids` and (ppl) `.logprobs` (a list of {token: Logprob})."""
    reference = {job.sample.key: out for job, out in results if job.policy == "none"}
    cells: dict[tuple, list[float]] = defaultdict(list)
    depth_cells: dict[tuple, list[float]] = defaultdict(list)
    ppl_logprobs: dict[tuple, list[float]] = defaultdict(list)
    for job, out in results:
        s = job.sample
        cell = (job.policy, job.budget, s.context, s.task)
        if s.task in NEEDLE_TASKS:
            value = scoring.contains_all(out.text, s.answers)
            depth_cells[cell + (s.depth,)].append(value)
        elif s.task == "agreement":
            if job.policy == "none":
                continue  # the reference itself
            value = scoring.prefix_agreement(list(reference[s.key].token_ids), list(out.token_ids), spec.agreement_tokens)
        else:  # ppl: the forced token's own logprob and rank at each position
            lps, ranks = forced_logprobs(out, s.continuation_ids)
            ppl_logprobs[cell].extend(lps)
            value = sum(1 for r in ranks if r == 1) / len(ranks)
        cells[cell].append(value)
    records = []
    for (policy, budget, context, task), values in cells.items():
        rec = {"policy": policy, "budget": budget, "context": context, "task": task,
               **scoring.summarize(values, seed=spec.seed)}
        if task == "ppl":
            rec["perplexity"] = scoring.perplexity(ppl_logprobs[(policy, budget, context, task)])
        records.append(rec)
    by_depth = [{"policy": p, "budget": b, "context": c, "task": t, "depth": d,
                 "accuracy": sum(v) / len(v), "n": len(v)} for (p, b, c, t, d), v in depth_cells.items()]
    return {"records": records, "by_depth": by_depth}


SAME_GRID = ("budgets", "contexts", "tasks", "depths", "samples", "seed", "agreement_tokens", "policy_contexts")


def check_same_grid(old: dict[str, Any], model: str, grid: dict[str, Any]) -> None:
    """An update of result `old` must run the same grid (`spec_record`) on the same model."""
    if old.get("model") != model:
        raise ValueError(f"--update: model {model!r} differs from the existing result's {old.get('model')!r}")
    for key in SAME_GRID:
        if old["spec"].get(key) != grid.get(key):
            raise ValueError(f"--update: {key}={grid.get(key)!r} differs from the existing result's "
                             f"{old['spec'].get(key)!r}; an update re-runs policies of the same grid")


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with the policies run in `new` (the full cache included) replaced by their new records: re-run
    a few policies after a change without re-running the grid. Both must be the same grid on the same model;
    `updates` lists what was re-run and when."""
    grid_old, grid_new = old["spec"], new["spec"]
    check_same_grid(old, new["model"], grid_new)
    rerun = {"none", *grid_new["policies"]}
    doc = dict(old)
    order = {p: i for i, p in enumerate(dict.fromkeys(r["policy"] for r in old["records"]))}  # rows stay put
    for key in ("records", "by_depth"):
        merged = [r for r in old[key] if r["policy"] not in rerun] + new[key]
        doc[key] = sorted(merged, key=lambda r: order.get(r["policy"], len(order)))
    doc["spec"] = {**grid_old, "policies": list(dict.fromkeys([*grid_old["policies"], *grid_new["policies"]]))}
    doc["updates"] = old.get("updates", []) + [{"policies": sorted(rerun), "date": new["date"],
                                                "seconds": new["seconds"], "requests": new["requests"]}]
    return doc


def forced_logprobs(out: Any, forced: Sequence[int]) -> tuple[list[float], list[int]]:
    """(logprob, rank) of each forced token; checks that the output really is the forced text."""
    if list(out.token_ids) != list(forced):
        raise RuntimeError("teacher forcing failed: the output differs from the forced continuation")
    lps, ranks = [], []
    for token, entry in zip(forced, out.logprobs):
        lp = entry[token]
        lps.append(lp.logprob)
        ranks.append(lp.rank)
    return lps, ranks
