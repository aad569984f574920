"""Locret training's loss and held-out metrics: Smooth-L1 + smoothness, Spearman and top-10% recall of the
predicted vs true causal importance per (layer, KV head)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from vllm_kvevict.policies.locret import RetainingHeads
from vllm_kvevict.training.locret_data import cis_target


def locret_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Smooth-L1(pred, target) + alpha * mean((pred[:, :-1] - pred[:, 1:])^2) over [H_kv, T]."""
    loss = F.smooth_l1_loss(pred, target)
    if pred.shape[-1] > 1:
        loss = loss + alpha * (pred[..., :-1] - pred[..., 1:]).pow(2).mean()
    return loss


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) along the last axis of a 1-D tensor, ties given their average rank."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() + 1) / 2  # mean of the 0-based positions start..end-1
    return avg[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson of tie-averaged ranks); nan if constant."""
    ra, rb = rankdata(a.flatten()), rankdata(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def topk_recall(pred: torch.Tensor, true: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of the true top-`fraction` tokens that are also in the predicted top-`fraction` (1-D)."""
    k = max(1, math.ceil(fraction * true.numel()))
    hit = torch.zeros(true.numel(), dtype=torch.bool)
    hit[torch.topk(true, k).indices] = True
    return float(hit[torch.topk(pred, k).indices].sum()) / k


@torch.no_grad()
def evaluate(heads: RetainingHeads, items: Iterable[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict:
    """Held-out loss, Spearman and top-10% recall, averaged over examples x layers x KV heads.

    The loss is the training loss over each whole prefix (layers averaged). Spearman and recall
    compare predictions with the true CIS per (layer, KV head) of one example, because that is the
    set a budget chooses within; they are averaged over examples, then reported overall and per
    layer (layers differ a lot: early layers attend locally, later ones to the sink and needles).
    """
    heads.eval()
    losses, per_layer_rho, per_layer_rec = [], None, None
    n = 0
    for feats, cis in items:
        target = cis_target(cis)
        num_layers = feats.shape[0]
        if per_layer_rho is None:
            per_layer_rho, per_layer_rec = [0.0] * num_layers, [0.0] * num_layers
        ex_loss = 0.0
        for layer in range(num_layers):
            pred = heads(layer, feats[layer].float())
            ex_loss += float(locret_loss(pred, target[layer], alpha))
            rhos = [spearman(pred[h], cis[layer, h]) for h in range(pred.shape[0])]
            recs = [topk_recall(pred[h], cis[layer, h]) for h in range(pred.shape[0])]
            per_layer_rho[layer] += sum(r for r in rhos if not math.isnan(r)) / len(rhos)
            per_layer_rec[layer] += sum(recs) / len(recs)
        losses.append(ex_loss / num_layers)
        n += 1
    if n == 0:
        raise ValueError("no held-out examples to evaluate")
    rho = [r / n for r in per_layer_rho]
    rec = [r / n for r in per_layer_rec]
    return {"loss": sum(losses) / n, "spearman": sum(rho) / len(rho), "recall_top10": sum(rec) / len(rec),
            "spearman_per_layer": [round(r, 4) for r in rho], "recall_top10_per_layer": [round(r, 4) for r in rec]}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
