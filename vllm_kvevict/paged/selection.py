"""TokenSelect over a paged KV cache: the torch twins of `selection_triton` (the CPU path).

Nothing is evicted; per (request, layer) and step, the queries attend to a selected subset of the
cached positions. With a request's block row `row` (position p at block row[p // bs], slot p % bs)
and `ctx` positions cached before this step's tokens:

    candidates   C = [n_init, ctx - n_local)
    scores       s[h, c] = q_h . K[h // G, C[c]]                (paged dot product, raw, no 1/sqrt(d))
    vote         v[c] = sum_h softmax_c(s[h, :])[c]              (head soft vote; optional max-pool)
    selected     S = [0, n_init) U C[topk(v, k)] U [ctx - n_local, ctx)
    attention    query i (position ctx + i) reads S, then this step's positions ctx .. ctx + i

Keys and values are [num_blocks, H_kv, bs, D] views with any strides (vLLM's CPU layout and the CUDA
flash layout both). A decode step is one query; a prefill chunk scores with its mean query.
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.soft_vote import soft_vote, vote_topk, with_fixed_windows

__all__ = ["paged_scores", "soft_vote", "vote_topk", "with_fixed_windows", "sparse_attention"]


def _gather(cache: torch.Tensor, row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cache[row[p // bs], :, p % bs] for every position: [len(positions), H_kv, D]."""
    bs = cache.shape[2]
    return cache[row[positions // bs].long(), :, positions % bs]


def paged_scores(query: torch.Tensor, keys: torch.Tensor, row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Raw dot products [H_q, C] of query [H_q, D] with the keys at `positions` (GQA: head h reads h // G)."""
    group = query.shape[0] // keys.shape[1]
    k = _gather(keys, row, positions).float()  # [C, H_kv, D]
    q = query.float().view(keys.shape[1], group, -1)  # [H_kv, G, D]
    return torch.einsum("hgd,chd->hgc", q, k).reshape(query.shape[0], -1)


def sparse_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                     selected: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    """query [Nq, H_q, D] at positions ctx .. ctx + Nq - 1 over the selected cached positions (all < ctx)
    and, causally, this step's own positions. Returns [Nq, H_q, D] in the query's dtype (fp32 inside)."""
    num_q, num_qh, dim = query.shape
    heads = keys.shape[1]
    group = num_qh // heads
    positions = torch.cat([selected.to(row.device), torch.arange(ctx, ctx + num_q, device=row.device)])
    k = _gather(keys, row, positions).float()  # [S + Nq, H_kv, D]
    v = _gather(values, row, positions).float()
    q = query.float().view(num_q, heads, group, dim)
    s = torch.einsum("nhgd,thd->nhgt", q, k) * scale
    own = torch.arange(num_q, device=row.device)
    visible = torch.ones(num_q, positions.numel(), dtype=torch.bool, device=row.device)
    visible[:, selected.numel():] = own.unsqueeze(0) <= own.unsqueeze(1)  # causal inside the step
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgt,thd->nhgd", torch.softmax(s, dim=-1), v)
    return out.reshape(num_q, num_qh, dim).to(query.dtype)
