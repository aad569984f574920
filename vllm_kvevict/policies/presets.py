"""The named policies: what each is, which parameters it takes, their defaults, and its class.

Defaults follow SPEC.md; where the reviews are silent, the [EXT] values from the reference code,
scaled to the default model's 8K context where the reference was tuned for 128K (noted inline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vllm_kvevict.policies.adakv import ADA_MODES
from vllm_kvevict.policies.gqa import REDUCTIONS
from vllm_kvevict.policies.params import Param

_MAXTOK = 1 << 20


def _window(default: int = 32) -> Param:
    return Param("window", int, default, "observation window: trailing prompt queries that score, always kept", 1, _MAXTOK)


_KERNEL = Param("kernel_size", int, 7, "pooling kernel along tokens (SnapKV: 7)", 1, 255)
_POOLING = Param("pooling", str, "max", "pooling of window scores along tokens", choices=("max", "avg", "none"))
_GQA = Param("gqa_reduce", str, "mean", "how a GQA group's query-head scores become one KV-head score", choices=REDUCTIONS)
_MIN_LEN = Param("min_prompt_len", int, 0, "prompts this short or shorter are not compressed", 0, _MAXTOK)
_BETA = Param("pyramid_beta", float, 20.0, "pyramid steepness: the top layer keeps base/beta", 1.0001, 1e6)
_ALPHA = Param("floor_alpha", float, 0.2, "Ada-KV safeguard: each head keeps at least alpha x the uniform share", 0.0, 1.0)
_ADA_MODE = Param(
    "ada_mode", str, "exact", "'exact' sums to the budget; 'official' rounds like the reference code", choices=ADA_MODES
)


def _sinks(default: int) -> Param:
    return Param("sink_tokens", int, default, "first tokens that are never evicted (attention sinks)", 0, _MAXTOK)


_SNAP = (_window(), _KERNEL, _POOLING, _GQA, _MIN_LEN, _sinks(0))


@dataclass(frozen=True)
class PolicySpec:
    name: str
    kind: str  # "none", "evict" or "select"
    description: str
    params: tuple[Param, ...]
    default_budget: int | float | None
    factory: Callable[[Any, dict[str, Any]], Any] | None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.default_budget is None else {"budget": self.default_budget}
        out.update({p.name: p.default for p in self.params})
        return out


def _lazy(module: str, cls: str) -> Callable[[Any, dict[str, Any]], Any]:
    # import on use: keeps `vllm-kvevict policies` fast and avoids import cycles
    def build(budget: Any, params: dict[str, Any]) -> Any:
        import importlib

        return getattr(importlib.import_module(f"vllm_kvevict.policies.{module}"), cls)(budget, params)

    return build


POLICIES: dict[str, PolicySpec] = {
    spec.name: spec
    for spec in (
        PolicySpec("none", "none", "full cache, nothing evicted (the baseline)", (), None, None),
        PolicySpec(
            "streamingllm", "evict", "attention sinks + recent window",
            (_sinks(4), _MIN_LEN), 1024, _lazy("streamingllm", "StreamingLLM"),
        ),
        PolicySpec(
            "snapkv", "evict", "observation-window attention, max-pooled, uniform per head; once after prefill",
            _SNAP, 1024, _lazy("snapkv", "SnapKV"),
        ),
        PolicySpec(
            "pyramidkv", "evict", "snapkv with a pyramid per-layer budget schedule",
            _SNAP + (_BETA,), 1024, _lazy("snapkv", "PyramidKV"),
        ),
        PolicySpec(
            "ada-snapkv", "evict", "snapkv scores + Ada-KV adaptive per-head budgets (ragged heads)",
            _SNAP + (_ALPHA, _ADA_MODE), 1024, _lazy("snapkv", "AdaSnapKV"),
        ),
        PolicySpec(
            "ada-pyramidkv", "evict", "pyramid layer schedule + Ada-KV adaptive per-head budgets",
            _SNAP + (_BETA, _ALPHA, _ADA_MODE), 1024, _lazy("snapkv", "AdaPyramidKV"),
        ),
        PolicySpec(
            "vatp", "evict", "attention x value L1 norm, sinks protected; after prefill and during decode",
            (
                _window(), _GQA, _MIN_LEN, _sinks(20),  # [EXT] README: sink_len 20
                Param("vatp_mode", str, "window", "attention over the window (Scissorhands) or all queries (H2O)",
                      choices=("window", "accumulate")),
                Param("decode_interval", int, 128, "decode tokens the tail may grow before re-compaction", 1, _MAXTOK),
            ),
            1024, _lazy("vatp", "VATP"),
        ),
        PolicySpec(
            "nacl", "evict", "proxy-token attention top-k + random sample from the rest; once after prefill",
            (
                _GQA, _MIN_LEN,
                _sinks(4),  # [EXT] 256 at 128K prompts; scaled to an 8K model
                Param("proxy_ratio", float, 0.01, "fraction of the prompt's tail used as proxy queries", 1e-6, 1.0),
                # [EXT] 0.12 proxy + 0.07 random of T: 7/19 of the selectable slots are sampled
                Param("random_fraction", float, 0.37, "share of each head's slots filled by random sampling", 0.0, 1.0),
                Param("seed", int, 0, "seed of the random eviction (same seed, same plan)", 0, 2**62),
            ),
            1024, _lazy("nacl", "NACL"),
        ),
        PolicySpec(
            "locret", "evict", "trained retaining heads predict causal importance; per prefill chunk",
            (
                _MIN_LEN, _sinks(0),
                # [EXT] chunk 3072 at 128K; scaled to an 8K model
                Param("chunk_size", int, 512, "prefill chunk after which the cache is compacted", 16, _MAXTOK),
                # [EXT] 2500 at 128K; scaled to an 8K model. Fewer stabilizers with kernel_size 3 retrieve far
                # more 4K needles at budget 1024 but lose fluency at 512 (docs/results.md, Locret ablation)
                Param("stabilizers", int, 256, "last tokens always kept (context continuity)", 0, _MAXTOK),
                # ours, not the paper's: pooling keeps a scored token's neighbours (a number's digits) with it
                Param("kernel_size", int, 1, "max-pool the predicted scores along tokens (1: off)", 1, 255),
                Param("weights", str, None, "retaining-head weights file (default: the shipped ones)", optional=True),
            ),
            1024, _lazy("locret", "Locret"),
        ),
        PolicySpec(
            "tokenselect", "select", "per-query head-soft-vote top-k over the full cache; nothing freed",
            (
                Param("n_init", int, 128, "initial tokens every query attends to", 0, _MAXTOK),
                Param("n_local", int, 512, "recent tokens every query attends to", 0, _MAXTOK),
                Param("similarity_threshold", float, 0.9, "selection-cache reuse when cos(q, q_cached) >= this", -1.0, 1.0),
                Param("select_pool_kernel", int, 0, "max-pool the vote along tokens (0: off)", 0, 255),
                Param("prefill_chunk", int, 512, "prefill queries select once per this many positions (mean query)",
                      1, _MAXTOK),
            ),
            2048, _lazy("tokenselect", "TokenSelect"),
        ),
    )
}


def get_spec(name: str) -> PolicySpec:
    spec = POLICIES.get(name)
    if spec is None:
        raise ValueError(f"kv_policy={name!r} is unknown: expected one of {', '.join(POLICIES)}")
    return spec
