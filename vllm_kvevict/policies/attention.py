"""Attention probabilities of a few trailing prompt queries over the prompt's keys, and how the scores
made from them are smoothed along tokens (pooling) or split between pooled and raw picks (`share_ranks`).

The scorers of SnapKV, NACL and VATP all start here. Reference math in fp32; the window is small
(tens of queries), so materialising [H_q, W, T] is cheap.
"""

from __future__ import annotations

import math

import torch

from vllm_kvevict.policies.gqa import expand_kv


def window_attention(
    queries: torch.Tensor, keys: torch.Tensor, causal: bool = True, query_start: int | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of W prompt queries over T keys.

    queries [H_q, W, D] sit at positions query_start .. query_start+W-1 (default: the last W, T-W ..
    T-1); keys [H_kv, T, D]. Returns probabilities [H_q, W, T] (fp32). With `causal`, query i never
    sees keys after its own position, as in the model; `key_mask` [H_kv, T] (False: no key there) is
    never seen either.
    """
    num_q, window, dim = queries.shape
    num_kv, num_tokens = keys.shape[0], keys.shape[1]
    if window > num_tokens:
        raise ValueError(f"window of {window} queries is longer than the {num_tokens}-token prompt")
    start = num_tokens - window if query_start is None else query_start
    group = num_q // num_kv
    # one matmul per KV head over its group's queries (query head h reads KV head h // g): no copy of the keys
    # but the fp32 one; the scale goes on the W queries, not the W x T logits
    scaled = queries.float().reshape(num_kv, group * window, dim) * (1.0 / math.sqrt(dim))
    logits = torch.matmul(scaled, keys.transpose(1, 2).float()).view(num_q, window, num_tokens)
    if causal and start + 1 < num_tokens:  # only keys after the first query's position can be in its future
        seen = logits[..., start + 1 :]
        q_pos = torch.arange(start, start + window, device=logits.device).unsqueeze(1)
        k_pos = torch.arange(start + 1, num_tokens, device=logits.device).unsqueeze(0)
        seen.masked_fill_(k_pos > q_pos, float("-inf"))
    if key_mask is not None:
        absent = ~expand_kv(key_mask.to(logits.device), group)  # [H_q, T]
        logits.masked_fill_(absent[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str, align: str = "center") -> torch.Tensor:
    """Smooth scores [H, N] along tokens (SnapKV's max-pool keeps neighbours of a hit together).

    align "center": token j pools [j - k//2, j + k//2] (a hit lifts its neighbours on both sides);
    "follow": token j pools [j - k + 1, j] (a hit lifts the k - 1 tokens after it: the continuation a
    generation reads next, e.g. the rest of a number whose first digits the question attends to).
    """
    if pooling == "none" or kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling={pooling!r} is invalid: expected one of 'max', 'avg', 'none'")
    if align not in ("center", "follow"):
        raise ValueError(f"pool_align={align!r} is invalid: expected 'center' or 'follow'")
    x = scores.unsqueeze(1)
    num = scores.shape[-1]
    if align == "follow":
        fill = float("-inf") if pooling == "max" else 0.0
        padded = torch.nn.functional.pad(x, (kernel_size - 1, 0), value=fill)
        if pooling == "max":
            return torch.nn.functional.max_pool1d(padded, kernel_size, stride=1).squeeze(1)
        sums = torch.nn.functional.avg_pool1d(padded, kernel_size, stride=1).squeeze(1) * kernel_size
        counts = torch.arange(1, num + 1, device=scores.device).clamp(max=kernel_size)
        return sums / counts
    pad = kernel_size // 2
    if pooling == "max":
        out = torch.nn.functional.max_pool1d(x, kernel_size, stride=1, padding=pad)
    else:
        out = torch.nn.functional.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return out.squeeze(1)[..., :num]


def pool_before_recent(scores: torch.Tensor, recent: int, kernel_size: int, pooling: str, align: str) -> torch.Tensor:
    """Pool scores [H, T] along tokens except the last `recent` (kept anyway: the observation window or
    the proxies), so their own mass does not bleed onto the tokens before them."""
    cut = scores.shape[-1] - recent
    head = pool_scores(scores[:, :cut], kernel_size, pooling, align)
    return torch.cat([head, scores[:, cut:]], dim=1)


def share_ranks(pooled: torch.Tensor, raw: torch.Tensor, share: float) -> torch.Tensor:
    """Scores [H, T] whose per-head top-k is the union of the top `share` of k by `pooled` and the rest by `raw`.

    Each token's key is min(rank by pooled / share, rank by raw / (1 - share)); ranking by it takes the
    two orders alternately in that proportion, so any top-k holds ~share*k pooled picks (the spans after
    a hit: a retrieved number whole) and the rest the raw picks (the single tokens attention points at,
    what free text reads). Scores become ranks, (T - j) / T for the j-th: the same scale for every head
    (an allocator comparing heads' magnitudes sees none). share 1: `pooled` itself (not ranked).
    Ties in either order go to the earlier position.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"pool_share={share} is invalid: expected a share in [0, 1]")
    if share == 1.0:
        return pooled
    num = pooled.shape[-1]
    positions = torch.arange(num, device=pooled.device, dtype=torch.float64)

    def ranks(scores: torch.Tensor) -> torch.Tensor:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return torch.empty_like(order, dtype=torch.float64).scatter_(-1, order, positions.expand_as(order).clone())

    by_raw = ranks(raw) / (1.0 - share)
    key = by_raw if share == 0.0 else torch.minimum(ranks(pooled) / share, by_raw)
    order = torch.sort(key, dim=-1, stable=True).indices  # ascending key; ties: the earlier position
    values = ((num - positions) / num).to(pooled.dtype).expand_as(order).clone()
    return torch.empty_like(values).scatter_(-1, order, values)
