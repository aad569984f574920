"""Training Locret's retaining heads (Huang et al., arXiv 2410.01805; SPEC.md 2.2.2 and 2.9) on CPU.

Pure torch + transformers: the frozen backbone runs in transformers, never in vLLM, so training
works wherever the model loads. Nothing is downloaded; all data is generated, seeded
(`training/locret_data.py` has steps 1 and 2).

Pipeline (each step's *why* is in its docstring):

1. Examples (`make_examples`): natural English text (Python's own reference docs, the same corpus
   as `eval.tasks.natural_sentences`) and the synthetic retrieval tasks (passkey, niah,
   niah_multikey, chat-templated) with the expected answer appended. Each example names a *query
   region* at its end: the question + answer for the tasks, the last 64-128 tokens for text.
2. Features and labels (`extract`): one backbone forward with hooks on every layer's q/k/v
   projections. Features are the pre-RoPE [q, k, v] of each prefix token, exactly what the policy
   gets at inference (`view.extra["qkv"]`). Labels are the causal importance score (CIS): per KV
   head, the max over the query region's positions and over the GQA group's query heads of the
   softmax attention probability into the prefix token (`cis_labels`). Both are cached on disk
   per example (`FeatureCache`) so that epochs do not rerun the backbone.
3. Training (`train`): the CIS is regressed in log space (`cis_target`), with Smooth-L1 plus the
   smoothness penalty alpha * mean((s[k] - s[k+1])^2), AdamW (lr 5e-4, betas 0.9/0.95), linear
   warmup then linear decay, gradient-norm clip 0.5, one step per prefix window of one example.
4. Held-out metrics (`evaluate`): loss, Spearman correlation of predicted vs true CIS per
   (layer, KV head), and top-10% recall; saved in the weights' meta, `metrics.json` and `loss.png`.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

import torch

from vllm_kvevict.policies.locret import RetainingHeads, load_retaining_heads
from vllm_kvevict.training.locret_data import TARGET_DESCRIPTION, TASK_MIX, FeatureCache, cis_target, head_shape, make_examples
from vllm_kvevict.training.locret_metrics import evaluate, locret_loss

#: The shipped weights' configuration (see models/locret/README.md for the measured run).
SHIPPED = dict(samples=48, heldout=12, context=(1024, 2048), epochs=8, hidden=64, seed=0)

#: `--tiny`: the real model on a few short examples; well under a minute on 2 CPU cores.
TINY = dict(samples=6, heldout=2, context=(256, 384), epochs=4, hidden=32, window=128, query_len=(32, 48))


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that determines a training run (and so its weights, given the same machine)."""

    samples: int = SHIPPED["samples"]  # training examples
    heldout: int = SHIPPED["heldout"]  # held-out examples (metrics only)
    context: tuple[int, int] = SHIPPED["context"]  # example length range in tokens, query region included
    epochs: int = SHIPPED["epochs"]
    hidden: int = SHIPPED["hidden"]  # d_R (the paper's 1024 is sized for an 8B model)
    seed: int = SHIPPED["seed"]
    lr: float = 5e-4  # [EXT] official train.py
    betas: tuple[float, float] = (0.9, 0.95)  # [EXT]
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of all steps with linear warmup (official: 2000 of 3000 steps)
    clip: float = 0.5  # [EXT] gradient clip
    alpha: float = 0.0025  # [EXT] smoothness weight
    window: int = 512  # prefix tokens per optimizer step
    query_len: tuple[int, int] = (64, 128)  # query region of natural-text examples
    threads: int = 0  # torch threads (0: one per two cores, leaving room for others)
    model: str | None = None  # Hugging Face directory (default: the prepared default model)
    cache_dir: Path | None = None  # feature cache (default: <vllm-kvevict cache>/locret-train)
    out: Path = Path("locret-out")
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (before any model loads)."""

        def bad(name: str, value, why: str) -> None:
            raise ValueError(f"{name}={value!r} {why}")

        for name in ("samples", "heldout", "epochs", "hidden", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                bad(name, value, "must be a whole number >= 1")
        lo, hi = self.context
        if lo < 128:
            bad("context", f"{lo},{hi}", "is too short: the minimum length must be >= 128 tokens")
        if hi < lo:
            bad("context", f"{lo},{hi}", "must be MIN,MAX with MIN <= MAX")
        if hi > 8192:
            bad("context", f"{lo},{hi}", "exceeds the model's 8192-token context")
        qlo, qhi = self.query_len
        if not 1 <= qlo <= qhi or qhi >= lo // 2:
            bad("query_len", f"{qlo},{qhi}", f"must be 1 <= MIN <= MAX < half the shortest context ({lo // 2})")
        if self.seed < 0:
            bad("seed", self.seed, "must be >= 0")
        if not self.lr > 0:
            bad("lr", self.lr, "must be > 0")
        if not 0 <= self.warmup < 1:
            bad("warmup", self.warmup, "must be a fraction in [0, 1)")
        if self.threads < 0:
            bad("threads", self.threads, "must be >= 0")

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        return replace(cls(**TINY), **overrides)

    def data_dict(self) -> dict:
        """What decides the examples (and so the cache keys)."""
        return {"samples": self.samples, "heldout": self.heldout, "context": list(self.context),
                "query_len": list(self.query_len), "seed": self.seed, "mix": list(TASK_MIX)}


def load_backbone(model: str | None = None):
    """(model, tokenizer, path) for a Hugging Face directory (default: the prepared default model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        from vllm_kvevict.models.smollm2 import prepare_default_model

        model = str(prepare_default_model(progress=False))
    elif not (Path(model) / "config.json").is_file():
        raise ValueError(f"model={model!r} is not a Hugging Face directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tok, model


def _windows(prefix: int, window: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) windows covering the prefix; a short remainder joins the last one."""
    bounds = list(range(0, prefix, window)) + [prefix]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < window // 2:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then linear decay to 0.1 (the official run warms up; the decay helps short runs)."""
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, total - warmup)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)


def train(cfg: TrainConfig, command: str = "", backbone=None, weights_name: str = "retaining_heads.pt") -> dict:
    """Run the whole pipeline; returns the metrics document (also written to `cfg.out/metrics.json`).

    Writes `cfg.out/<weights_name>` (RetainingHeads.save, fp16, meta with the command, seed, data
    sizes, held-out metrics, timings), `metrics.json` and `loss.png`. `backbone` = (model, tokenizer,
    path) lets callers (tests) reuse a loaded model. Deterministic for a given seed on one machine:
    seeded initialisation, seeded data and visiting order, and no nondeterministic CPU kernels.
    """
    cfg.validate()
    start = time.monotonic()
    threads = cfg.threads or max(1, (os.cpu_count() or 2) // 2)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net, tok, model_path = backbone or load_backbone(cfg.model)
        shape = head_shape(net.config, cfg.hidden)
        cache = FeatureCache(cfg.cache_dir or _default_cache_dir(), model_path)
        train_ex = make_examples(tok, cfg.samples, cfg.seed, cfg.context, cfg.query_len, "train")
        held_ex = make_examples(tok, cfg.heldout, cfg.seed, cfg.context, cfg.query_len, "heldout")

        # 1. features and labels (the backbone's only use)
        t0 = time.monotonic()
        todo = [ex for ex in train_ex + held_ex if not cache.has(ex)]
        with _progress(sum(len(ex.ids) for ex in todo), "backbone (tokens)", cfg.progress) as bar:
            for ex in todo:
                cache.get(ex, net)
                bar.update(len(ex.ids))
        extract_s = time.monotonic() - t0
        held = [cache.get(ex, None) for ex in held_ex]

        # 2. training
        torch.manual_seed(cfg.seed)
        heads = RetainingHeads(shape)
        opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        prefix_lens = [ex.prefix_len for ex in train_ex]
        steps_per_epoch = sum(len(_windows(p, cfg.window)) for p in prefix_lens)
        total = steps_per_epoch * cfg.epochs
        warmup = max(1, int(cfg.warmup * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
        order_rng = random.Random(f"locret-order/{cfg.seed}")
        history = {"step_loss": [], "epoch_train_loss": [], "heldout": [evaluate(heads, held, cfg.alpha)]}
        t0 = time.monotonic()
        step = 0
        with _progress(total, "train (steps)", cfg.progress) as bar:
            for epoch in range(cfg.epochs):
                heads.train()
                epoch_losses = []
                for idx in order_rng.sample(range(len(train_ex)), len(train_ex)):
                    feats, cis = cache.get(train_ex[idx], None)
                    target = cis_target(cis)  # over the whole prefix: windows share one normalisation
                    wins = _windows(feats.shape[1], cfg.window)
                    for a, b in order_rng.sample(wins, len(wins)):
                        loss = sum(locret_loss(heads(layer, feats[layer, a:b].float()), target[layer, :, a:b],
                                               cfg.alpha) for layer in range(shape.num_layers)) / shape.num_layers
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(heads.parameters(), cfg.clip)
                        opt.step()
                        sched.step()
                        step += 1
                        history["step_loss"].append(loss.item())
                        epoch_losses.append(loss.item())
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{history['step_loss'][-1]:.3f}")
                history["epoch_train_loss"].append(sum(epoch_losses) / len(epoch_losses))
                history["heldout"].append(evaluate(heads, held, cfg.alpha))
                bar.set_postfix(epoch=epoch + 1, heldout=f"{history['heldout'][-1]['loss']:.3f}")
        train_s = time.monotonic() - t0
    finally:
        torch.set_num_threads(old_threads)

    final = history["heldout"][-1]
    summary = {k: round(final[k], 4) for k in ("loss", "spearman", "recall_top10")}
    doc = {
        "command": command,
        "config": _jsonable(asdict(cfg)),
        "shape": asdict(shape),
        "target": TARGET_DESCRIPTION,
        "data": {"train_examples": len(train_ex), "heldout_examples": len(held_ex),
                 "train_prefix_tokens": sum(prefix_lens), "heldout_prefix_tokens": sum(e.prefix_len for e in held_ex),
                 "train_kinds": _count(ex.kind for ex in train_ex), "heldout_kinds": _count(ex.kind for ex in held_ex),
                 "mix": list(TASK_MIX), "steps": total},
        "heldout": summary,
        "heldout_before_training": {k: round(history["heldout"][0][k], 4) for k in ("loss", "spearman", "recall_top10")},
        "heldout_per_layer": {"spearman": final["spearman_per_layer"], "recall_top10": final["recall_top10_per_layer"]},
        "time_s": {"backbone": round(extract_s, 1), "train": round(train_s, 1),
                   "total": round(time.monotonic() - start, 1)},
        "threads": threads,
        "history": {"step_loss": [round(x, 5) for x in history["step_loss"]],
                    "epoch_train_loss": [round(x, 5) for x in history["epoch_train_loss"]],
                    "heldout_loss": [round(h["loss"], 5) for h in history["heldout"]],
                    "heldout_spearman": [round(h["spearman"], 5) for h in history["heldout"]],
                    "heldout_recall_top10": [round(h["recall_top10"], 5) for h in history["heldout"]],
                    "steps_per_epoch": steps_per_epoch},
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: doc[k] for k in ("command", "config", "target", "data", "heldout", "heldout_before_training",
                                "heldout_per_layer", "time_s")}
    meta["seed"] = cfg.seed
    heads.save(out / weights_name, meta=meta, dtype=torch.float16)
    (out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_losses(doc, out / "loss.png")
    return doc


def _count(items: Iterable[str]) -> dict:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _default_cache_dir() -> Path:
    from vllm_kvevict import envs

    return envs.cache_dir() / "locret-train"


def plot_losses(doc: dict, path: Path) -> Path:
    """Left: train loss per step (raw, moving average) and held-out loss per epoch (epoch 0 = untrained).
    Right: held-out Spearman and top-10% recall per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = doc["history"]
    steps = hist["step_loss"]
    per_epoch = hist["steps_per_epoch"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(range(1, len(steps) + 1), steps, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    w = max(1, per_epoch // 4)
    if len(steps) >= w:
        avg = [sum(steps[i - w + 1 : i + 1]) / w for i in range(w - 1, len(steps))]
        ax.plot(range(w, len(steps) + 1), avg, color="tab:blue", lw=1.5, label=f"train (mean of {w})")
    ax.plot([e * per_epoch for e in range(len(hist["heldout_loss"]))], hist["heldout_loss"], "o-",
            color="tab:red", lw=1.5, label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Smooth-L1 + smoothness loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    data = doc["data"]
    ax.set_title(f"{data['train_examples']} train / {data['heldout_examples']} held-out examples, "
                 f"d_R {doc['shape']['hidden']}", fontsize=9)
    epochs = range(len(hist["heldout_spearman"]))
    ax2.plot(epochs, hist["heldout_spearman"], "o-", color="tab:green", label="Spearman (pred vs true CIS)")
    ax2.plot(epochs, hist["heldout_recall_top10"], "s-", color="tab:purple", label="top-10% recall")
    ax2.set_xlabel("epoch (0 = untrained)")
    ax2.set_ylim(min(0.0, min(hist["heldout_spearman"])), 1.0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    final = doc["heldout"]
    ax2.set_title(f"held-out: Spearman {final['spearman']:.3f}, recall {final['recall_top10']:.3f}", fontsize=9)
    fig.suptitle("Locret retaining heads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check(weights: str | Path, model: str | None = None) -> dict:
    """Load `weights` against the model's shape (raises on a mismatch); returns its meta."""
    from transformers import AutoConfig

    if model is None:
        from vllm_kvevict.models.smollm2 import prepare_default_model

        model = str(prepare_default_model(progress=False))
    cfg = AutoConfig.from_pretrained(model)
    heads = load_retaining_heads(weights, expect=head_shape(cfg, 0))
    return {"shape": asdict(heads.shape), "parameters": sum(p.numel() for p in heads.parameters()),
            "meta": getattr(heads, "meta", {})}
