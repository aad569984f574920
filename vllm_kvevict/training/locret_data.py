"""Locret training data: examples, pre-RoPE q/k/v features and causal-importance labels (transformers).

Steps 1 and 2 of the pipeline in `training/locret.py`: `make_examples` builds seeded examples (natural
text and retrieval tasks, each with a query region at its end), `extract` runs the frozen backbone
with hooks on the q/k/v projections, `cis_labels` turns the query region's attention into per-KV-head
labels, `cis_target` is the regression target, and `FeatureCache` keeps features and labels on disk.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vllm_kvevict.policies.locret import HeadShape

#: Bump when features, labels or the example generator change: old cache entries are then ignored.
CACHE_VERSION = 1

#: Example kinds in the order they repeat. Half natural text (what most prompts are), half retrieval
#: tasks (where one needle sentence must survive eviction; the answer tokens attend to it).
TASK_MIX = ("text", "passkey", "text", "niah", "text", "niah_multikey")
TASK_KINDS = ("text", "passkey", "niah", "niah_multikey")

#: The target transform (`cis_target`): log(CIS * N + TARGET_EPS), N = number of prefix tokens.
TARGET_EPS = 1e-2
TARGET_DESCRIPTION = "log(cis * prefix_len + 1e-2)"

#: Held-out examples draw from a different seed stream, and natural text from the corpus' last part.
HELDOUT_SEED_OFFSET = 1_000_003
HELDOUT_TEXT_FRACTION = 0.15

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
