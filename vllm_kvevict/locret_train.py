"""Training Locret's retaining heads (Huang et al., arXiv 2410.01805; SPEC.md 2.2.2 and 2.9) on CPU.

Pure torch + transformers: the frozen backbone runs in transformers, never in vLLM, so training
works wherever the model loads. Nothing is downloaded; all data is generated here, seeded.

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

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from vllm_kvevict.policies.locret import HeadShape, RetainingHeads, load_retaining_heads

#: Bump when features, labels or the example generator change: old cache entries are then ignored.
CACHE_VERSION = 1

#: Example kinds in the order they repeat. Half natural text (what most prompts are), half retrieval
#: tasks (where one needle sentence must survive eviction; the answer tokens attend to it).
TASK_MIX = ("text", "passkey", "text", "niah", "text", "niah_multikey")
TASK_KINDS = ("text", "passkey", "niah", "niah_multikey")

#: The target transform (`cis_target`): log(CIS * N + TARGET_EPS), N = number of prefix tokens.
TARGET_EPS = 1e-2
TARGET_DESCRIPTION = "log(cis * prefix_len + 1e-2)"

#: The shipped weights' configuration (see models/locret/README.md for the measured run).
SHIPPED = dict(samples=48, heldout=12, context=(1024, 2048), epochs=8, hidden=64, seed=0)

#: `--tiny`: the real model on a few short examples; well under a minute on 2 CPU cores.
TINY = dict(samples=6, heldout=2, context=(256, 384), epochs=4, hidden=32, window=128, query_len=(32, 48))

#: Held-out examples draw from a different seed stream, and natural text from the corpus' last part.
HELDOUT_SEED_OFFSET = 1_000_003
HELDOUT_TEXT_FRACTION = 0.15


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


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids whose last `query_len` tokens are the query region."""

    kind: str
    ids: tuple[int, ...]
    query_len: int
    name: str  # stable identity (kind, split, seed, index, length): the cache key's readable part

    @property
    def prefix_len(self) -> int:
        return len(self.ids) - self.query_len


def _task_question(kind: str, key: str | None) -> tuple[str, str]:
    """The question and answer prefix `eval.tasks.make_sample` used (to locate the query region)."""
    if kind == "passkey":
        return "What is the pass key?", "The pass key is"
    return (f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is")


def make_examples(tokenizer, n: int, seed: int, context: tuple[int, int], query_len: tuple[int, int],
                  split: str = "train") -> list[Example]:
    """`n` seeded examples, kinds cycling through TASK_MIX.

    Task examples are `eval.tasks.make_sample` prompts (chat template, needle at a random depth)
    followed by the expected answer and the end-of-turn token: the query region is the question,
    the template tail, the answer prefix and the answer, because those are the positions whose
    attention a retrieval answer depends on (the paper labels with answer tokens). Text examples
    are plain natural text whose last 64-128 tokens stand for "the rest of the prompt".

    split="heldout" uses another seed stream and, for text, a disjoint part of the corpus (the last
    15% of the sentences) so held-out metrics measure generalisation, not memorised text.
    """
    from vllm_kvevict.eval.tasks import PromptBuilder, hf_builder, make_sample, natural_sentences

    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} must be 'train' or 'heldout'")
    builder = hf_builder(tokenizer)
    plain = PromptBuilder(builder.encode, None)
    sentences = natural_sentences()
    cut = int(len(sentences) * (1 - HELDOUT_TEXT_FRACTION))
    corpus = sentences[:cut] if split == "train" else sentences[cut:]
    data_seed = seed if split == "train" else seed + HELDOUT_SEED_OFFSET
    end_of_turn = builder.encode(tokenizer.eos_token) if tokenizer.eos_token else []
    out = []
    for i in range(n):
        kind = TASK_MIX[i % len(TASK_MIX)]
        rng = random.Random(f"locret/{data_seed}/{i}")
        length = rng.randint(*context)
        name = f"{kind}-{split}-{data_seed}-{i}-{length}"
        if kind == "text":
            q = rng.randint(*query_len)
            ids = [t for s in plain.haystack(corpus, rng.randrange(len(corpus)), length) for t in s]
            out.append(Example(kind, tuple(ids), q, name))
            continue
        depth = round(rng.uniform(0.05, 0.95), 3)
        sample = make_sample(builder, kind, length, depth, i, data_seed)
        answer = builder.encode(" " + sample.answers[0] + ".") + end_of_turn
        question, prefix = _task_question(kind, sample.meta.get("key"))
        tail = builder.encode("\n\n" + question) + builder.tail + builder.encode(prefix)
        ids = list(sample.prompt_ids)
        if ids[len(ids) - len(tail):] != tail:  # make_sample changed: fail loudly, not mislabel
            raise RuntimeError(f"{kind} prompt does not end with its question; update _task_question")
        # the length range is the prompt's (what the eval tasks use); the answer adds ~5-10 tokens
        out.append(Example(kind, tuple(ids + answer), len(tail) + len(answer), name))
    return out


# ---------------------------------------------------------------------------------------------
# labels and features
# ---------------------------------------------------------------------------------------------


def cis_labels(q: torch.Tensor, k: torch.Tensor, query_len: int, scale: float | None = None) -> torch.Tensor:
    """Causal importance of every prefix token, per KV head: [H_kv, T - query_len].

    q [H_q, T, d] and k [H_kv, T, d] are post-RoPE. For prefix token j and KV head g,

        CIS[g, j] = max over query positions p in [T - query_len, T) and query heads h of group g
                    of softmax_j'(q[h, p] . k[g, j'] / sqrt(d))[j]   (causal: j' <= p)

    i.e. the largest attention probability any later query (the answer, the rest of the text) puts
    on token j ([EXT] official data_gen.py: max over the GQA group, then over answer positions).
    Query head h belongs to KV head h // (H_q / H_kv), as in transformers' repeat_kv. Only the query
    rows are computed ([H_q, query_len, T] scores), so memory is linear in T.
    """
    hq, t, d = q.shape
    hkv = k.shape[0]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if not 0 < query_len < t:
        raise ValueError(f"query_len={query_len} must be in [1, {t - 1}] for {t} tokens")
    group, prefix = hq // hkv, t - query_len
    scale = d**-0.5 if scale is None else scale
    qq = q[:, prefix:].float().reshape(hkv, group * query_len, d)
    scores = torch.matmul(qq, k.float().transpose(1, 2)) * scale  # [H_kv, G*Q, T]
    pos = torch.arange(prefix, t).repeat(group)  # query position of each row
    scores.masked_fill_(torch.arange(t)[None, :] > pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)[..., :prefix]
    return probs.reshape(hkv, group, query_len, prefix).amax(dim=(1, 2))


def cis_target(cis: torch.Tensor, eps: float = TARGET_EPS) -> torch.Tensor:
    """The regression target: log(CIS * N + eps), N = the number of prefix tokens (last axis).

    Why not CIS itself (as the paper does): CIS is a probability with a heavy tail; most tokens sit
    near 1/N and a few (the sink, needles, punctuation) near 1. Smooth-L1 on raw CIS is dominated
    by those few and sees everything else as ~0, so it cannot rank the bulk, and ranking is all
    the policy uses (top-k per head). The log makes relative differences count equally; the factor
    N (uniform attention = 1) removes the 1/N shrinkage of longer prompts so one head serves every
    length; eps = 1e-2 floors tokens below 1% of uniform attention, whose exact order is noise
    and never decides what a budget keeps. The transform is strictly increasing, so the top-k of
    predicted targets is the top-k of predicted CIS and the policy needs no inverse.
    """
    return torch.log(cis.float() * cis.shape[-1] + eps)


def head_shape(config, hidden: int) -> HeadShape:
    """HeadShape of a transformers (Llama-like) config with d_R = hidden."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return HeadShape(config.num_hidden_layers, config.num_attention_heads,
                     getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim, hidden)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def extract(model, ids: Sequence[int], query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the frozen backbone: (features [L, P, F] fp16, cis [L, H_kv, P] fp32), P = prefix.

    Forward hooks on each layer's q_proj/k_proj/v_proj capture the pre-RoPE projections (the head's
    input contract). RoPE is applied here with the model's own rotary embedding (cos/sin for
    positions 0..T-1) to get the post-RoPE q/k the attention really used, and the layer's labels are
    reduced immediately in the v_proj hook, so no [T, T] matrix and no all-layer activations are
    kept. Only the lm_head is skipped (`model.model`): its 49K-vocab matmul is a third of the cost.
    Features are stored in fp16 (the projections are well inside its range; the head's own error
    is orders of magnitude larger than fp16 rounding) to halve the cache.
    """
    base = model.model
    layers = base.layers
    cfg = model.config
    shape = head_shape(cfg, 1)
    t = len(ids)
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    positions = torch.arange(t)[None]
    cos, sin = base.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0].float(), sin[0].float()  # [T, d]
    prefix = t - query_len
    feats = torch.empty(len(layers), prefix, shape.in_features, dtype=torch.float16)
    cis = torch.empty(len(layers), shape.num_kv_heads, prefix, dtype=torch.float32)
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(_module, _inputs, output):
            captured[name] = output[0].float()  # [T, width]

        return hook

    def finish(layer_idx, attn):
        def hook(_module, _inputs, output):
            q, k, v = captured.pop("q"), captured.pop("k"), output[0].float()
            feats[layer_idx] = torch.cat([q, k, v], dim=-1)[:prefix].to(torch.float16)
            qh = q.view(t, shape.num_heads, shape.head_dim).transpose(0, 1)
            kh = k.view(t, shape.num_kv_heads, shape.head_dim).transpose(0, 1)
            qh = qh * cos + _rotate_half(qh) * sin
            kh = kh * cos + _rotate_half(kh) * sin
            cis[layer_idx] = cis_labels(qh, kh, query_len, getattr(attn, "scaling", None))

        return hook

    try:
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            handles.append(attn.q_proj.register_forward_hook(keep("q")))
            handles.append(attn.k_proj.register_forward_hook(keep("k")))
            handles.append(attn.v_proj.register_forward_hook(finish(i, attn)))
        base(input_ids=input_ids, position_ids=positions, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return feats, cis


class FeatureCache:
    """Per-example (features, labels) on disk, keyed by the model and the example's token ids.

    A key covers everything the entry depends on (model directory name and weights' size, ids,
    query length, CACHE_VERSION), so a changed generator or model never reads stale entries.
    Entries are written to a temporary name and renamed: an interrupted run leaves no torn files.
    """

    def __init__(self, root: Path, model_path: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        weights = sorted(Path(model_path).glob("*.safetensors"))
        self.model_tag = f"{Path(model_path).name}:{sum(w.stat().st_size for w in weights)}"

    def path(self, ex: Example) -> Path:
        h = hashlib.sha256(f"{CACHE_VERSION}|{self.model_tag}|{ex.query_len}|{ex.ids}".encode()).hexdigest()[:16]
        return self.root / f"{ex.name}-{h}.pt"

    def get(self, ex: Example, model) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.path(ex)
        if path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return blob["feats"], blob["cis"]
        feats, cis = extract(model, ex.ids, ex.query_len)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"feats": feats, "cis": cis}, tmp)
        os.replace(tmp, path)
        return feats, cis

    def has(self, ex: Example) -> bool:
        return self.path(ex).is_file()


# ---------------------------------------------------------------------------------------------
# loss and metrics
# ---------------------------------------------------------------------------------------------


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
