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

The `*_batch` functions do the same for many requests at once (a decode batch: one query each, every
request its own block row, context and selection; padded entries carry -inf scores or -1 positions);
the single-request functions are their one-row case.
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.attention import pool_scores
from vllm_kvevict.policies.soft_vote import soft_vote, vote_topk, with_fixed_windows

__all__ = ["paged_scores", "paged_scores_batch", "soft_vote", "soft_vote_batch", "vote_topk", "vote_topk_batch",
           "with_fixed_windows", "sparse_attention", "sparse_attention_batch"]


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


def paged_scores_batch(queries: torch.Tensor, keys: torch.Tensor, tables: torch.Tensor, first: int,
                       num_cand: torch.Tensor, max_cand: int) -> torch.Tensor:
    """Row r's query [H_q, D] against its keys at positions first .. first + num_cand[r] - 1 (its own block
    row tables[r]): [R, H_q, max_cand] fp32, -inf past num_cand[r]."""
    num_rows, num_qh, dim = queries.shape
    heads, bs = keys.shape[1], keys.shape[2]
    c = torch.arange(max_cand, device=queries.device)
    valid = c[None, :] < num_cand[:, None].to(queries.device)  # [R, C]
    pos = torch.where(valid, first + c[None, :], 0)
    blocks = tables.gather(1, (pos // bs).long()).long()
    k = keys[blocks, :, pos % bs].float()  # [R, C, H_kv, D]
    q = queries.float().view(num_rows, heads, num_qh // heads, dim)
    scores = torch.einsum("rhgd,rchd->rhgc", q, k).reshape(num_rows, num_qh, max_cand)
    return scores.masked_fill(~valid[:, None, :], float("-inf"))


def soft_vote_batch(scores: torch.Tensor) -> torch.Tensor:
    """Head soft vote per row: [R, H, C] (-inf where padded) -> [R, C]."""
    return torch.softmax(scores.float(), dim=-1).sum(dim=1)


def vote_topk_batch(scores: torch.Tensor, k: torch.Tensor, pool_kernel: int = 0, vote_fn=soft_vote_batch
                    ) -> torch.Tensor:
    """Per row, the candidate indices of its top-k[r] votes, sorted, then -1: [R, max(k)] (`vote_fn`: the
    soft vote; the Triton twin passes its fused one)."""
    vote = vote_fn(scores)
    if pool_kernel > 1:
        vote = pool_scores(vote, pool_kernel, "max")
    kmax = int(k.max())
    top = torch.topk(vote, min(kmax, vote.shape[-1]), dim=-1).indices  # by vote, descending
    keep = torch.arange(top.shape[-1], device=top.device)[None, :] < k.to(top.device)[:, None]
    top = torch.where(keep, top, torch.iinfo(top.dtype).max)
    top = torch.sort(top, dim=-1).values
    return torch.where(top == torch.iinfo(top.dtype).max, -1, top)


def sparse_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                     selected: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    """query [Nq, H_q, D] at positions ctx .. ctx + Nq - 1 over the selected cached positions (all < ctx)
    and, causally, this step's own positions. Returns [Nq, H_q, D] in the query's dtype (fp32 inside).
    One request's piece: its keys are gathered once for all its queries (`sparse_attention_batch` gathers
    per query, right for one decode query per request, wasteful for a 512-token prefill piece)."""
    num_q, num_qh, dim = query.shape
    heads = keys.shape[1]
    positions = torch.cat([selected.to(row.device), torch.arange(ctx, ctx + num_q, device=row.device)])
    k = _gather(keys, row, positions).float()  # [S + Nq, H_kv, D]
    v = _gather(values, row, positions).float()
    q = query.float().view(num_q, heads, num_qh // heads, dim)
    s = torch.einsum("nhgd,thd->nhgt", q, k) * scale
    own = torch.arange(num_q, device=row.device)
    visible = torch.ones(num_q, positions.numel(), dtype=torch.bool, device=row.device)
    visible[:, selected.numel():] = own.unsqueeze(0) <= own.unsqueeze(1)  # causal inside the step
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgt,thd->nhgd", torch.softmax(s, dim=-1), v)
    return out.reshape(num_q, num_qh, dim).to(query.dtype)


def sparse_attention_batch(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                           selected: torch.Tensor, num_selected: torch.Tensor, ctx: torch.Tensor, scale: float,
                           query_req: torch.Tensor | None = None, query_off: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Query i of request r = query_req[i] (default: row i, one query per request) at position ctx[r] +
    query_off[i] (default 0) reads r's selected[r, :num_selected[r]] (all < ctx[r]), then r's own positions
    ctx[r] .. ctx[r] + query_off[i], through its block row tables[r]. Returns [Nq, H_q, D] (fp32 inside)."""
    num_q, num_qh, dim = queries.shape
    heads = keys.shape[1]
    device = queries.device
    req = torch.arange(num_q, device=device) if query_req is None else query_req.to(device).long()
    off = torch.zeros(num_q, dtype=torch.long, device=device) if query_off is None else query_off.to(device).long()
    nsel = num_selected.to(device).long()[req]
    if selected.shape[1] == 0:  # nothing selected anywhere: only the step's own tokens
        selected = selected.new_zeros(selected.shape[0], 1)
    width = selected.shape[1] + int(off.max()) + 1
    j = torch.arange(width, device=device)[None, :]
    own = ctx.to(device).long()[req][:, None] + j - nsel[:, None]  # this step's positions past the selection
    picked = selected.to(device).long()[req].gather(1, j.clamp(max=selected.shape[1] - 1).expand(num_q, -1))
    pos = torch.where(j < nsel[:, None], picked, own)
    visible = j < (nsel + off + 1)[:, None]
    pos = torch.where(visible, pos, 0)
    blocks = tables.to(device)[req].gather(1, (pos // keys.shape[2]).long()).long()
    k = keys[blocks, :, pos % keys.shape[2]].float()  # [Nq, T, H_kv, D]
    v = values[blocks, :, pos % keys.shape[2]].float()
    q = queries.float().view(num_q, heads, num_qh // heads, dim)
    s = torch.einsum("nhgd,nthd->nhgt", q, k) * scale
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgt,nthd->nhgd", torch.softmax(s, dim=-1), v)
    return out.reshape(num_q, num_qh, dim).to(queries.dtype)
