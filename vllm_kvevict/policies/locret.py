"""Locret (Huang et al., arXiv 2410.01805): trained retaining heads predict causal importance.

A retaining head per layer maps a token's pre-RoPE [q, k, v] to one causal importance score (CIS)
per KV head: fc1 ((H_q + 2 H_kv) * d -> d_R), the model's activation (SiLU), fc2 (d_R -> H_kv), no
biases (SPEC.md 2.9). During chunked prefill the cache keeps the top-`budget` units by predicted CIS,
the last `stabilizers` tokens forced in. The heads must be trained for the model
(`vllm_kvevict.training.locret`; trained heads ship for the default model in models/locret/); without
weights the policy refuses to run rather than invent scores.

The shipped heads predict log(CIS * N + 0.01) (see `training.locret_data.cis_target`), not CIS itself: the
transform is strictly increasing, so ranking the outputs (all the policy does) ranks by CIS.

Shapes: qkv [T, (H_q + 2 H_kv) * d] -> CIS [H_kv, T].
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vllm_kvevict.policies.attention import pool_scores
from vllm_kvevict.policies.budget import resolve_budget
from vllm_kvevict.policies.declaration import Need, Trigger
from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.params import MAX_TOKENS, MIN_PROMPT_LEN, Param, decode_interval, sink_tokens
from vllm_kvevict.policies.plan import LayerView

# default (stabilizers, kernel_size) when the budget is (True) or is not (False) at least 1/WIDE_FROM of the
# prompt (docs/results.md: the Locret ablation and the n = 24 agreement run)
AUTO_SETTINGS = {True: (64, 3), False: (256, 1)}
WIDE_FROM = 4

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "models" / "locret"


class LocretWeightsMissing(ValueError):
    """No trained retaining heads are available for the model being served."""


@dataclass(frozen=True)
class HeadShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int = 1024  # d_R

    @property
    def in_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


class RetainingHead(nn.Module):
    """One layer's retaining head: [T, (H_q + 2 H_kv) d] -> [T, H_kv]."""

    def __init__(self, in_features: int, hidden: int, num_kv_heads: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, num_kv_heads, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(qkv)))


class RetainingHeads(nn.Module):
    """All layers' retaining heads for one model shape."""

    def __init__(self, shape: HeadShape):
        super().__init__()
        self.shape = shape
        self.heads = nn.ModuleList(
            RetainingHead(shape.in_features, shape.hidden, shape.num_kv_heads) for _ in range(shape.num_layers)
        )

    def forward(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Predicted CIS [H_kv, T] for layer `layer`."""
        return self.heads[layer](qkv).transpose(0, 1)

    def save(self, path: str | Path, meta: dict | None = None, dtype: torch.dtype | None = None) -> None:
        """Write shape, meta and weights; `dtype` (e.g. torch.float16) stores the weights smaller.

        Loading always gives fp32 modules: a ranking head loses nothing measurable to fp16 storage
        and the shipped file stays a few MB."""
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        torch.save({"shape": asdict(self.shape), "meta": meta or {}, "state_dict": state}, path)


def load_retaining_heads(path: str | Path, expect: HeadShape | None = None) -> RetainingHeads:
    """Load trained heads, checking they were trained for a model of shape `expect` (ignoring d_R)."""
    path = Path(path)
    if not path.is_file():
        raise LocretWeightsMissing(f"locret weights file {str(path)!r} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    shape = HeadShape(**blob["shape"])
    if expect is not None:
        for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(shape, field) != getattr(expect, field):
                raise ValueError(
                    f"locret weights {str(path)!r} were trained for {field}={getattr(shape, field)}, "
                    f"but the model has {field}={getattr(expect, field)}"
                )
    heads = RetainingHeads(shape)
    heads.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    heads.meta = blob.get("meta", {})  # training record (command, data, held-out metrics)
    return heads.eval()


def default_weights_path(model_name: str = "SmolLM2-135M-Instruct") -> Path:
    return WEIGHTS_DIR / f"{model_name}.pt"


def retain_topk(kept_cis: torch.Tensor, chunk_cis: torch.Tensor, budget: int, stabilizers: int) -> torch.Tensor:
    """One Locret step: indices (per KV head, sorted) into cat(kept, chunk) that survive.

    kept_cis [H_kv, N], chunk_cis [H_kv, C]. The last `stabilizers` entries are forced in; the rest
    of the budget goes to the highest predicted CIS. Returns [H_kv, min(budget, N + C)].
    """
    scores = torch.cat([kept_cis, chunk_cis], dim=1).float()
    total = scores.shape[1]
    keep = min(budget, total)
    stab = min(stabilizers, keep)
    if stab > 0:
        scores[:, total - stab :] = float("inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.sort(order, dim=1).values


class Locret(EvictionPolicy):
    """Inside vLLM (per prefill chunk): `token_scores` scores each step's tokens as the model computes
    them; at every chunk boundary `run_scores` pools the tokens computed since the last one (a run whose
    edges the prompt fixes, not the schedule) and `retain` picks what the cache keeps from [kept | run] by
    the scores remembered with the kept tokens and the run's (vllm_kvevict/paged/layout.py has the block
    arithmetic). `plan` (the base pipeline) is the one-shot variant over a whole prompt."""

    name = "locret"
    description = "trained retaining heads predict causal importance; per prefill chunk"
    param_specs = (
        MIN_PROMPT_LEN, sink_tokens(0),
        # [EXT] chunk 3072 at 128K; scaled to an 8K model
        Param("chunk_size", int, 512, "prefill chunk after which the cache is compacted", 16, MAX_TOKENS),
        # [EXT] 2500 at 128K; scaled to an 8K model. Fewer stabilizers with kernel_size 3 retrieve far
        # more needles from a budget of 1/4 of the prompt up but lose fluency at 1/8 (docs/results.md,
        # Locret ablation): by default each is chosen by the budget's share of the prompt (`for_prompt`)
        Param("stabilizers", int, None, "last tokens always kept (context continuity); null: 64 when the budget "
              "is at least 1/4 of the prompt, else 256", 0, MAX_TOKENS, optional=True),
        # ours, not the paper's: pooling keeps a scored token's neighbours (a number's digits) with it; it
        # pools each chunk's run of tokens whole, so the kept tokens do not depend on how steps split it
        Param("kernel_size", int, None, "max-pool the predicted scores along tokens (1: off); null: 3 when the "
              "budget is at least 1/4 of the prompt, else 1", 1, 255, optional=True),
        Param("weights", str, None, "retaining-head weights file (default: the shipped ones)", optional=True),
        decode_interval(),
    )
    trigger = Trigger.PER_PREFILL_CHUNK
    needs = frozenset({Need.PRE_ROPE_QKV})

    def __init__(self, budget, params):
        super().__init__(budget, params)
        self.chunk_size = int(self.params["chunk_size"])
        self.prefill_chunk = self.chunk_size
        self.auto = {name for name in ("stabilizers", "kernel_size") if self.params[name] is None}
        narrow = AUTO_SETTINGS[False]  # until resolved for a prompt (`for_prompt`)
        self.stabilizers = narrow[0] if "stabilizers" in self.auto else int(self.params["stabilizers"])
        self.kernel_size = narrow[1] if "kernel_size" in self.auto else int(self.params["kernel_size"])
        self._resolved: dict[tuple[int, int], Locret] = {}
        weights = self.params.get("weights") or default_weights_path()
        if not Path(weights).is_file():
            raise LocretWeightsMissing(
                f"locret needs trained retaining heads and none were found at {str(weights)!r}. "
                "Weights ship only for the default model (SmolLM2-135M-Instruct); for another model train "
                "them with `vllm-kvevict locret train --model DIR` and pass weights=PATH."
            )
        self.heads = load_retaining_heads(weights)

    def for_prompt(self, num_tokens: int) -> Locret:
        """With `stabilizers` or `kernel_size` left to their default (null): from a budget of 1/4 of the
        prompt up, 64 stabilizers and pooling over 3 (13 of 15 4K needles at 1/4 against 4 of 15, greedy
        agreement at 1/4 of a 2K prompt 0.11 vs 0.07, n = 24); below it, 256 and no pooling (fewer
        stabilizers with pooling made summaries loop at 1/8 of a 4K prompt)."""
        if not self.auto:
            return self
        wide = AUTO_SETTINGS[resolve_budget(self.budget, num_tokens) * WIDE_FROM >= num_tokens]
        settings = (wide[0] if "stabilizers" in self.auto else self.stabilizers,
                    wide[1] if "kernel_size" in self.auto else self.kernel_size)
        if settings not in self._resolved:  # one resolved copy per setting (the heads are shared)
            policy = copy.copy(self)
            policy.stabilizers, policy.kernel_size = settings
            policy.auto, policy._resolved = set(), {}
            self._resolved[settings] = policy
        return self._resolved[settings]

    def recent_tokens(self, num_tokens: int) -> int:
        return min(self.stabilizers, num_tokens)

    def score(self, view: LayerView) -> torch.Tensor:
        qkv = view.extra.get("qkv")
        if qkv is None:
            raise ValueError("locret needs the prompt's pre-RoPE q/k/v (view.extra['qkv'], [T, (H_q+2H_kv)*d])")
        return self._predict(view.layer, qkv)

    def token_scores(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Predicted CIS [H_kv, T] of tokens whose pre-RoPE q/k/v rows are `qkv` [T, (H_q+2H_kv)*d]; the
        heads run where the rows are, the scores come back to the host (they are kept until compaction)."""
        expected = self.heads.shape.in_features
        if qkv.dim() != 2 or qkv.shape[1] != expected:
            raise ValueError(f"locret: q/k/v rows of shape {tuple(qkv.shape)}, the heads take [T, {expected}]")
        return self._predict(layer, qkv).cpu()

    def run_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores [H_kv, N] a compaction ranks the run of tokens computed since the last compaction point by,
        from their per-token predictions [H_kv, N]: max-pooled over `kernel_size` within the run. The run's
        edges are compaction points (the prompt and `chunk_size` fix them), so the same prompt keeps the
        same tokens however its prefill was split into steps."""
        return pool_scores(scores, self.kernel_size, "max")

    def _predict(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        if next(self.heads.parameters()).device != qkv.device:
            self.heads.to(qkv.device)  # the heads follow the model (once)
        with torch.no_grad():
            return self.heads(layer, qkv.float())

    def retain(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Indices [H_kv, min(keep, N)] (sorted) into a region whose predicted CIS are `scores` [H_kv, N]:
        the first `sink_tokens` and the last `stabilizers` positions, then the highest scores."""
        scores = scores.float().clone()
        sinks = min(self.sink_tokens, keep, scores.shape[1])
        if sinks:
            scores[:, :sinks] = float("inf")
        return retain_topk(scores[:, :0], scores, keep, self.stabilizers)
