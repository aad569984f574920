"""Head-lane addressing of a request's compacted KV region: ragged per-head lengths (Ada-KV).

vLLM gives every KV head the same slice of every block. A *lane* is one such slice: `block_size`
slots of one (block, head) pair. Inside a request's compacted blocks we stop tying lanes to heads:
each (layer, KV head) owns its own run of lanes and its own length, so a head that keeps 3 lanes'
worth of tokens and a head that keeps 1 together use 4 lanes, not 2 x 3. The tail stays standard.

    request block row:  | c0          | c1          | c2          | freed ...   | t0 ... (tail)
    lanes of a block:   | L0  L1  L2  | L3  L4  L5  | L6  L7  L8  |             |  (H_kv = 3)
    global lane         g = b * H_kv + j          (block b of the row, lane j inside it)

    head h owns lanes   [start_h, start_h + count_h),  start_h = count_0 + ... + count_(h-1)
    kept token i of h   lane start_h + i // bs, slot i % bs
    physical address    (row[g // H_kv], g % H_kv, slot)            (block, lane, slot)
    tail token t of h   (row[n + t // bs], h, t % bs)               as vLLM wrote it

    compacted blocks n = ceil(sum_h count_h / H_kv), maxed over layers (every layer shares the row)

Everything here is torch on neutral cache views (`cache_layout`): keys and values as
[num_blocks, H_kv, bs, D] with any strides. `pack_lanes` and `lane_attention` are the torch twins of
`move_triton.pack_lanes` and `lane_attention_triton.lane_attention`, and the CPU path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from vllm_kvevict.paged.compact import move_tokens


def lane_counts(lengths: Sequence[int], block_size: int) -> list[int]:
    """Lanes each head needs for its kept tokens (a head with 0 tokens needs none)."""
    return [math.ceil(n / block_size) for n in lengths]


def lane_starts(counts: Sequence[int]) -> list[int]:
    """First global lane of each head (exclusive prefix sum of the counts)."""
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    return starts


def blocks_for_lanes(total_lanes: int, num_kv_heads: int) -> int:
    return math.ceil(total_lanes / num_kv_heads)


@dataclass(frozen=True)
class LaneMap:
    """One layer's lane assignment for one request: per-head start lane and token count."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    block_size: int

    @classmethod
    def build(cls, lengths: Sequence[int], block_size: int) -> "LaneMap":
        return cls(tuple(lane_starts(lane_counts(lengths, block_size))), tuple(int(n) for n in lengths), block_size)

    @property
    def num_heads(self) -> int:
        return len(self.lengths)

    @property
    def total_lanes(self) -> int:
        return sum(lane_counts(self.lengths, self.block_size))

    @property
    def num_blocks(self) -> int:
        return blocks_for_lanes(self.total_lanes, self.num_heads)

    def addresses(self, head: int, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row index, lane, slot) of the first `num` (default: all) kept tokens of `head`."""
        n = self.lengths[head] if num is None else num
        i = torch.arange(n)
        g = self.starts[head] + i // self.block_size
        return g // self.num_heads, g % self.num_heads, i % self.block_size


def pack_addresses(row: torch.Tensor, kept: Sequence[torch.Tensor], lanes: LaneMap, into: torch.Tensor | None = None
                   ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Where each kept token is read from and written to: ((block, head, slot), (block, lane, slot)).

    Sources use standard addressing (head h's position p at (row[p // bs], h, p % bs)); destinations
    are the head's lanes in order, in the row's leading blocks or in `into` (copy-on-compact's fresh
    blocks). All six tensors have one entry per kept token, heads concatenated.
    Shared by the torch twin below and the Triton one (`move_triton.pack_lanes`).
    """
    if len(kept) != lanes.num_heads:
        raise ValueError(f"kept has {len(kept)} heads, the lane map {lanes.num_heads}")
    block_size = lanes.block_size
    dst = _lane_destinations(row if into is None else into, kept, lanes)
    src = []
    for h, pos in enumerate(kept):
        pos = pos.to(row.device).long()
        src.append((row[pos // block_size].long(), torch.full_like(pos, h), pos % block_size))
    return tuple(torch.cat(parts) for parts in zip(*src)), dst


def refill_addresses(row: torch.Tensor, candidates: tuple[torch.Tensor, ...], kept: Sequence[torch.Tensor],
                     lanes: LaneMap) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """As `pack_addresses`, with sources given as positions of the `lane_candidates` grid (a decode-time
    re-compaction: head h's kept grid positions move into its own lanes, in order)."""
    dst = _lane_destinations(row, kept, lanes)
    src = tuple(torch.cat([grid[h, pos.to(grid.device).long()] for h, pos in enumerate(kept)]) for grid in candidates)
    return src, dst


def _lane_destinations(row: torch.Tensor, kept: Sequence[torch.Tensor], lanes: LaneMap) -> tuple[torch.Tensor, ...]:
    """(block, lane, slot) of every head's lane slots, heads concatenated, in order; each head must keep
    exactly what its lanes hold."""
    for h, pos in enumerate(kept):
        if pos.numel() != lanes.lengths[h]:
            raise ValueError(f"head {h} keeps {pos.numel()} tokens, its lanes hold {lanes.lengths[h]}")
    dst = []
    for h in range(lanes.num_heads):
        r, lane, slot = (t.to(row.device) for t in lanes.addresses(h))
        dst.append((row[r].long(), lane, slot))
    return tuple(torch.cat(parts) for parts in zip(*dst))


def pack_lanes(keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor, kept: Sequence[torch.Tensor],
               lanes: LaneMap) -> None:
    """In place: head h's kept positions (standard addressing) move to its lanes, in the given order.

    keys, values: [num_blocks, H_kv, bs, D] views of one layer's cache; row: the request's block row.
    Everything kept is read into a temporary first: sources and destinations share the leading blocks.
    """
    if keys.shape[1] != lanes.num_heads:
        raise ValueError(f"the lane map has {lanes.num_heads} heads, the cache {keys.shape[1]}")
    move_tokens(keys, values, *pack_addresses(row, kept, lanes))


def lane_candidates(row: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, num_compacted: int,
                    tail_len: int, block_size: int
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Addresses of every head's tokens as one padded [H_kv, P] grid, P = max length + tail_len:

        head h, position p    p < len_h: its lane token p      (row[g // H_kv], g % H_kv, p % bs),
                                                                g = start_h + p // bs
                              len_h <= p < max len: padding     (any real address; mask False)
                              p = max len + t: its tail token t (row[n + t // bs], h, t % bs)

    So a decode-time re-compaction scores the lanes and the tail of every head in one dense view whose
    tail starts at the same position for all heads. Returns ((block, lane, slot), mask), each [H_kv, P].
    """
    device = row.device
    num_kv = lengths.numel()
    lengths = lengths.to(device).long()
    longest = int(lengths.max()) if num_kv else 0
    p = torch.arange(longest + tail_len, device=device)[None, :].expand(num_kv, -1)
    heads = torch.arange(num_kv, device=device)[:, None].expand_as(p)
    in_lane = p < lengths[:, None]
    lane = starts.to(device).long()[:, None] + torch.where(in_lane, p, 0) // block_size
    t = (p - longest).clamp(min=0)
    in_tail = p >= longest
    block = torch.where(in_lane, row[(lane // num_kv).clamp(max=row.numel() - 1)],
                        row[(num_compacted + t // block_size).clamp(max=row.numel() - 1)]).long()
    slot = torch.where(in_lane, p % block_size, t % block_size)
    return (block, torch.where(in_lane, lane % num_kv, heads), slot), in_lane | in_tail


def gather_head(keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor, lanes: LaneMap, head: int,
                num_compacted: int, tail_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K, V [len_h + tail_len, D] of one head: its lanes, then its tail tokens."""
    r, lane, slot = lanes.addresses(head)
    blocks = row[r].long()
    t = torch.arange(tail_len)
    tail_blocks = row[num_compacted + t // lanes.block_size].long()
    k = torch.cat([keys[blocks, lane, slot], keys[tail_blocks, head, t % lanes.block_size]])
    v = torch.cat([values[blocks, lane, slot], values[tail_blocks, head, t % lanes.block_size]])
    return k, v


def lane_attention_row(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                       lanes: LaneMap, num_compacted: int, tail_len: int, scale: float) -> torch.Tensor:
    """One request, head by head: the naive reference `lane_attention` is tested against.

    Attention of the last `Nq` tail tokens' queries over compacted lanes + tail.
    query [Nq, H_q, D] are the queries of tail tokens tail_len - Nq .. tail_len - 1 (a decode step has
    Nq = 1; a prefill chunk after a compaction has more). Every compacted token precedes the tail, so
    it is visible to every query; tail tokens are causal. GQA: query head q reads KV head q // G.
    Returns [Nq, H_q, D] in the query's dtype (computed in fp32).
    """
    num_q, num_qh, _ = query.shape
    group = num_qh // lanes.num_heads
    if tail_len < num_q:
        raise ValueError(f"tail_len={tail_len} must cover the {num_q} query tokens")
    out = torch.empty_like(query)
    qpos = torch.arange(tail_len - num_q, tail_len)  # tail positions of the queries
    for h in range(lanes.num_heads):
        k, v = gather_head(keys, values, row, lanes, h, num_compacted, tail_len)
        n_c = lanes.lengths[h]
        visible = torch.ones(num_q, n_c + tail_len, dtype=torch.bool)
        visible[:, n_c:] = torch.arange(tail_len).unsqueeze(0) <= qpos.unsqueeze(1)
        q = query[:, h * group : (h + 1) * group].float()  # [Nq, G, D]
        s = torch.einsum("ngd,td->ngt", q, k.float()) * scale
        s = s.masked_fill(~visible.unsqueeze(1), float("-inf"))
        out[:, h * group : (h + 1) * group] = torch.einsum("ngt,td->ngd", torch.softmax(s, dim=-1), v.float()).to(query.dtype)
    return out


def lane_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
                   lane_start: torch.Tensor, head_len: torch.Tensor, num_compacted: torch.Tensor,
                   query_req: torch.Tensor, query_pos: torch.Tensor, scale: float,
                   max_queries: int = 64, longest: int | None = None) -> torch.Tensor:
    """Batched lane attention, vectorised over queries and heads (the torch twin of the Triton kernel
    `lane_attention_triton.lane_attention`, same arguments; the CPU path).

    query [Nq, H_q, D]; keys, values [num_blocks, H_kv, bs, D] (any strides); block_table [B, M] (each
    row's compacted blocks first, then its tail's); lane_start, head_len [B, H_kv]; num_compacted [B];
    query_req [Nq] (its row in block_table) and query_pos [Nq] (its position in the tail). Query token i
    of KV head h reads index space j in [0, head_len + query_pos + 1): j < head_len is lane token j
    (`LaneMap.addresses`), else tail token j - head_len. Queries go `max_queries` at a time, so memory
    stays bounded for a long prefill chunk (`longest`, the kernel's split hint, is not needed here).
    Returns [Nq, H_q, D] in the query's dtype (fp32 inside).
    """
    num_q, num_qh, dim = query.shape
    num_kv, block_size = keys.shape[1], keys.shape[2]
    if num_qh % num_kv:
        raise ValueError(f"{num_qh} query heads are not a multiple of {num_kv} KV heads")
    group = num_qh // num_kv
    out = torch.empty_like(query)
    heads = torch.arange(num_kv, device=query.device)[None, :, None]
    for lo in range(0, num_q, max_queries):
        hi = min(num_q, lo + max_queries)
        req = query_req[lo:hi].long()
        hlen = head_len[req].long()[..., None]  # [n, H, 1]
        total = hlen + query_pos[lo:hi].long()[:, None, None] + 1
        j = torch.arange(int(total.max()), device=query.device)  # [L]
        in_lanes = j < hlen  # [n, H, L]
        lane = lane_start[req].long()[..., None] + j // block_size
        tail = (j - hlen).clamp(min=0)
        col = torch.where(in_lanes, lane // num_kv, num_compacted[req].long()[:, None, None] + tail // block_size)
        block = block_table[req[:, None, None], col.clamp(max=block_table.shape[1] - 1)].long().clamp(min=0)
        kv_head = torch.where(in_lanes, lane % num_kv, heads)
        slot = torch.where(in_lanes, j % block_size, tail % block_size)
        k = keys[block, kv_head, slot].float()  # [n, H, L, D]
        v = values[block, kv_head, slot].float()
        q = query[lo:hi].float().view(hi - lo, num_kv, group, dim)
        s = torch.einsum("nhgd,nhld->nhgl", q, k) * scale
        s = s.masked_fill(~(j < total)[:, :, None, :], float("-inf"))
        o = torch.einsum("nhgl,nhld->nhgd", torch.softmax(s, dim=-1), v)
        out[lo:hi] = o.reshape(hi - lo, num_qh, dim).to(query.dtype)
    return out


@dataclass(frozen=True)
class LaneSequences:
    """Lane attention restated as ordinary paged attention, one sequence per (row, KV head), over a lane
    view of the cache in which every lane is a one-head block (block id b * H_kv + j):

        sequence (r, h)    head h's lanes, then its tail blocks: [lane tokens | tail up to the query]
        its queries        row r's query tokens, KV head h's G query heads, the last ones of the sequence

    Valid only when every head's lane tokens fill whole lanes (`plan_lanes` fills them), so the tail
    starts at a block boundary of the sequence. A backend's own paged kernel can then run it. The
    queries do not depend on the layer; lengths and blocks do, and carry the lane maps' leading dims
    (one step builds every layer's at once: [L, S] and [L, S, M]).
    """

    token: torch.Tensor  # [S_q] the batch token of each sequence query (sequence-major)
    head: torch.Tensor  # [S_q] its KV head
    query_start: torch.Tensor  # [S + 1] int32, sequence s's queries are [query_start[s], query_start[s + 1])
    seq_lens: torch.Tensor  # [..., S] int32
    block_table: torch.Tensor  # [..., S, M] int32 lane-block ids


def lane_sequences(block_table: torch.Tensor, lane_start: torch.Tensor, head_len: torch.Tensor,
                   num_compacted: torch.Tensor, query_req: torch.Tensor, query_pos: torch.Tensor,
                   num_kv: int, block_size: int) -> LaneSequences | None:
    """`lane_attention`'s arguments as per-(row, head) sequences (None: some head has a partial lane).
    lane_start, head_len: [R, H_kv], or [L, R, H_kv] for every layer of a step at once. A row's query
    tokens must be consecutive in the batch and end at its latest tail position."""
    if bool((head_len % block_size).any()):
        return None
    device = block_table.device
    rows = block_table.shape[0]
    req = query_req.long()
    counts = torch.bincount(req, minlength=rows)  # query tokens per row
    first = torch.cumsum(counts, 0) - counts  # each row's first token
    tail_len = torch.zeros(rows, dtype=torch.long, device=device).scatter_reduce(
        0, req, query_pos.long() + 1, "amax")  # tail tokens up to the row's last query
    # queries: sequence (r, h) holds row r's tokens for head h, sequence-major
    seq_of_row = counts.repeat_interleave(num_kv)  # [S]
    query_start = torch.zeros(rows * num_kv + 1, dtype=torch.int32, device=device)
    query_start[1:] = torch.cumsum(seq_of_row, 0)
    seq = torch.repeat_interleave(torch.arange(rows * num_kv, device=device), seq_of_row)
    offset = torch.arange(seq.numel(), device=device) - query_start[seq].long()
    token = first[seq // num_kv] + offset
    head = seq % num_kv
    # blocks: lanes (global lane g -> block row[g // H] * H + g % H), then the tail's (row[n + t] * H + h)
    lead = head_len.shape[:-2]  # () or (L,)
    num_lanes = (head_len // block_size).long()  # [..., R, H]
    tail_blocks = -(-tail_len // block_size)  # [R]
    width = int((num_lanes + tail_blocks[:, None]).max())
    j = torch.arange(width, device=device)
    in_lanes = j < num_lanes[..., None]  # [..., R, H, W]
    lane = lane_start.long()[..., None] + j
    tail = (num_compacted.long()[:, None, None] + j - num_lanes[..., None]).clamp(min=0)
    col = torch.where(in_lanes, lane // num_kv, tail).clamp(max=block_table.shape[1] - 1)
    block = block_table.long()[torch.arange(rows, device=device)[:, None, None], col]
    heads = torch.arange(num_kv, device=device)[:, None]
    ids = torch.where(in_lanes, block * num_kv + lane % num_kv, block * num_kv + heads)
    seq_lens = (head_len + tail_len[:, None]).reshape(*lead, rows * num_kv).to(torch.int32)
    return LaneSequences(token, head, query_start, seq_lens, ids.reshape(*lead, rows * num_kv, width).to(torch.int32))
