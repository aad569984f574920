"""The vLLM engine behind `eval` and `bench`: the default model as users run it, plus forced decoding.

One engine serves every policy of a run: the server-wide policy is `none` with prefix caching off,
and each request picks its policy and budget through `extra_args` (the OpenAI body's `vllm_xargs`),
exactly like a per-request override on `vllm serve`.

`ForceTokens` is a per-request logits processor that makes a request emit the token ids listed in
`extra_args["force_tokens"]`. With vLLM's default `logprobs_mode="raw_logprobs"` the returned
logprob (and rank) of each emitted token is the model's own, before the processor: that is
teacher-forced scoring of a continuation *after* the prompt was compacted, which prompt logprobs
(computed during prefill, before any eviction) cannot give.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

FORCE_KEY = "force_tokens"


def cpu_defaults(kv_gib: float | None = None) -> None:
    """The CPU settings of DESIGN.md section 2, unless the caller set them (must run before vLLM imports)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: inspectable
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if kv_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_gib:g}")


def is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def force_tokens_processor():
    """The ForceTokens logits-processor class (built lazily: vLLM is imported only here)."""
    import torch
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class ForceTokens(AdapterLogitsProcessor):
        @classmethod
        def validate_params(cls, params) -> None:
            forced = (params.extra_args or {}).get(FORCE_KEY)
            if forced is not None and not (isinstance(forced, list) and all(isinstance(t, int) for t in forced)):
                raise ValueError(f"{FORCE_KEY} must be a list of token ids, got {forced!r}")

        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params):
            forced = (params.extra_args or {}).get(FORCE_KEY)
            if not forced:
                return None

            def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                step = len(output_ids)
                if step < len(forced):
                    target = forced[step]
                    logits.fill_(float("-inf"))
                    logits[target] = 0.0
                return logits

            return force

    return ForceTokens


def make_llm(model: str, max_model_len: int, *, block_size: int = 128, kv_blocks: int | None = None,
             max_num_seqs: int | None = None, force_tokens: bool = False, **extra: Any):
    """An LLM for the default settings of this machine (fp32 + eager on CPU) that serves every policy."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=model, max_model_len=max_model_len, block_size=block_size, seed=0, enable_prefix_caching=False,
        additional_config={"kv_evict": {"policy": "none"}},
    )
    if is_cpu():
        kwargs.update(dtype="float32", enforce_eager=True)
    if kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = kv_blocks
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if force_tokens:
        kwargs["logits_processors"] = [force_tokens_processor()]
    kwargs.update(extra)
    return LLM(**kwargs)


def servable_policies() -> list[str]:
    """Every registered policy (besides `none`) the engines built here can serve: all of them on CPU,
    where they run eagerly; on CUDA those that do not need eager execution."""
    from vllm_kvevict.policies.registry import names

    eager = is_cpu()
    return [name for name in names() if name != "none" and _servable(name, None, eager)]


def check_policies(policies: Sequence[str], budgets: Sequence[int | float]) -> None:
    """ValueError naming a policy the engine cannot serve, or a budget it refuses."""
    from vllm_kvevict.integration.vllm.settings import check_servable
    from vllm_kvevict.policies.config import PolicyConfig
    from vllm_kvevict.policies.registry import names

    for policy in policies:
        if policy == "none":
            continue
        name, fields = split_variant(policy)
        if name not in names():
            raise ValueError(f"policy {name!r} is unknown; choose from {', '.join(names())}")
        for budget in budgets:
            check_servable(PolicyConfig.from_dict({"policy": name, "budget": budget, **fields}), eager=is_cpu())


def split_variant(policy: str) -> tuple[str, dict[str, str]]:
    """'snapkv:kernel_size=9:pool_align=follow' -> ('snapkv', {'kernel_size': '9', 'pool_align': 'follow'}):
    a registered policy with some preset fields changed, one row of an ablation. A plain name has none."""
    name, *pairs = policy.split(":")
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"policy variant {policy!r}: {pair!r} is not FIELD=VALUE "
                             "(write NAME:FIELD=VALUE[:FIELD=VALUE...])")
        fields[key] = value
    return name, fields


def _servable(policy: str, budget: int | float | None, eager: bool) -> bool:
    from vllm_kvevict.integration.vllm.settings import check_servable
    from vllm_kvevict.policies.config import PolicyConfig

    try:
        check_servable(PolicyConfig.from_dict({"policy": policy, "budget": budget}), eager=eager)
    except ValueError:
        return False
    return True


def policy_args(policy: str, budget: int | float | None) -> dict[str, Any]:
    """The per-request override for (policy, budget): what a client puts in `vllm_xargs` (a variant's
    fields included, `split_variant`)."""
    if policy == "none":
        return {"kv_policy": "none"}
    name, fields = split_variant(policy)
    return {"kv_policy": name, "kv_budget": budget, **{f"kv_{k}": v for k, v in fields.items()}}


