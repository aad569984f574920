"""Block arithmetic of a compacted request, shared by the scheduler and the worker.

Both sides must agree on how many blocks a request keeps without talking, so the rule is a pure
function of (prompt length, policy, block size, layers). Pure python (`physical_rows`: the same rule
on a tensor of block rows).

A request's logical blocks after compaction (block size bs, prompt length T, C = (T // bs) * bs):

    logical block:  0   1  ..  n-1 | n  ..  C/bs - 1  | C/bs   C/bs+1 ...
                    [  compacted   ] [ freed (null)  ] [ tail: prompt's last partial block,
                     n*bs kept tokens  returned to pool   then every decoded token ]
                     per KV head

The compacted region holds exactly n*bs tokens per KV head (each head its own selection, RoPE
already applied). The tail keeps the prompt's T - C last tokens as vLLM wrote them. The physical
sequence seen by attention is the compacted region followed by the tail:

    physical length = n*bs + (logical length - C)
    block row       = row[0:n] + row[C/bs:]

Positions and slot mapping stay logical, so new tokens keep landing in the tail.

Decode-time eviction (VATP) re-compacts at fixed points. With an interval I (rounded up to whole
blocks), the points are P_k = T + k*I, k = 0, 1, ...; when a request's KV reaches P_k (k >= 1), the
policy chooses n*bs tokens among [compacted region | tail up to C_k = C + k*I], writes them into the
compacted region, and the tail's full blocks in [C_{k-1}, C_k) are freed. Epoch e of a request with
L tokens of KV is the largest k with P_k <= L; its tail starts at C_e:

    physical length = n*bs + (L - C_e)        block row = row[0:n] + row[C_e/bs:]

So memory stays at n blocks plus at most I/bs + 1 tail blocks however long the request decodes.

Per-chunk eviction during prefill (Locret) uses the same epochs with points inside the prompt: P_k =
P_0 + k*I for chunk I, P_0 the first chunk boundary past the n kept blocks, up to the last boundary
<= T. Every point is block-aligned (C_k = P_k), so the request never holds more than n + I/bs
blocks while its prompt is prefilled, and n + ceil((T - P_last)/bs) after it, plus what it decodes:

    logical block:  0 .. n-1 | n ..  P_0/bs - 1 | P_0/bs .. P_1/bs - 1 | ... | P_K/bs ...
                    [ kept  ] [ freed at P_0   ] [ freed at P_1       ]       [ tail ]

In general C_k = (P_k // bs) * bs, so tail_block(k) = P_k // bs for both schemes.

Copy-on-compact (prefix caching on): the prompt's full blocks may be shared through the prefix cache,
so compaction 0 never writes into them. The scheduler appends n fresh blocks to the row on the step
that reaches P_0 (F = ceil(P_0 / bs)), the policy's kept tokens are written there, and before the next
step both sides move them to the front (`copied_row`); the row's original full blocks go back to the
pool with their hashes, cached and evictable, and the request hashes nothing more:

    step reaching P_0:  0 ... C_0/bs - 1 | C_0/bs ... F - 1 | F ... F + n - 1
                        [ full, hashed   ] [ tail (partial) ] [ fresh: kept tokens ]
    after it:           F ... F + n - 1 | null ... | C_0/bs ... F - 1 | (new tail blocks)
                        [ compacted     ]            [ tail         ]

From then on the row is the one above and later compactions (decode-time, per chunk) work in place
inside the fresh blocks, which were never hashed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

@dataclass(frozen=True)
class Compaction:
    """The outcome of compacting one request's prompt (all in tokens / logical blocks)."""

    prompt_len: int
    block_size: int
    kept_blocks: int  # n: blocks of the compacted region
    tail_start_block: int  # C / bs: first logical block of the tail (after the prompt's compaction)
    interval_blocks: int = 0  # I / bs: decode-time re-compaction every I tokens (0: never)
    first_point: int | None = None  # P_0 (None: the prompt's end); per-chunk prefill eviction starts earlier
    last_epoch: int | None = None  # the last compaction (None: every interval for ever, if any)
    copy_on_compact: bool = False  # compaction 0 writes into n fresh blocks, not row[0:n] (prefix caching)

    @property
    def start(self) -> int:
        """P_0: where the first compaction runs."""
        return self.prompt_len if self.first_point is None else self.first_point

    @property
    def compactable_tokens(self) -> int:
        """C: the prompt tokens in full blocks, which the policy selects from."""
        return self.tail_start_block * self.block_size

    @property
    def kept_tokens(self) -> int:
        """Tokens per KV head in the compacted region (n * bs)."""
        return self.kept_blocks * self.block_size

    @property
    def freed_blocks(self) -> int:
        return self.tail_start_block - self.kept_blocks

    @property
    def is_noop(self) -> bool:
        return self.freed_blocks <= 0

    # ---- epochs (decode-time re-compaction) ---------------------------------------------------------
    def point(self, epoch: int) -> int:
        """P_k: the KV length at which compaction k runs (P_0 = the prompt length unless first_point)."""
        return self.start + epoch * self.interval_blocks * self.block_size

    @property
    def last_point(self) -> int | None:
        """The KV length of the last compaction (None: compactions go on while decoding)."""
        if self.interval_blocks == 0:
            return self.start
        return None if self.last_epoch is None else self.point(self.last_epoch)

    def epoch(self, kv_len: int) -> int:
        """The last compaction done once `kv_len` tokens have KV (-1: none yet, or a no-op plan)."""
        if self.is_noop or kv_len < self.start:
            return -1
        if self.interval_blocks == 0:
            return 0
        epoch = (kv_len - self.start) // (self.interval_blocks * self.block_size)
        return epoch if self.last_epoch is None else min(epoch, self.last_epoch)

    def next_point(self, kv_len: int) -> int | None:
        """The first compaction point after `kv_len` (None if there is none)."""
        if self.is_noop:
            return None
        if kv_len < self.start:
            return self.start
        if not self.interval_blocks:
            return None
        epoch = self.epoch(kv_len) + 1
        return None if self.last_epoch is not None and epoch > self.last_epoch else self.point(epoch)

    def tail_block(self, epoch: int) -> int:
        """C_e / bs: first logical block of the tail in epoch e."""
        return self.tail_start_block + epoch * self.interval_blocks

    def freed_range(self, epoch: int) -> tuple[int, int]:
        """Logical blocks [start, end) freed by compaction `epoch`."""
        start = self.kept_blocks if epoch == 0 else self.tail_block(epoch - 1)
        return start, self.tail_block(epoch)

    @property
    def fresh_block(self) -> int:
        """F: where the n fresh blocks of copy-on-compact sit in the row on the step that reaches P_0."""
        return -(-self.start // self.block_size)

    def copied_row(self, row: Sequence[T], filler: T) -> tuple[list[T], list[T]]:
        """Copy-on-compact, after compaction 0: (the row with the fresh blocks moved to the front and
        `filler` where the freed blocks were, the original blocks the request lets go of)."""
        n, tail, fresh = self.kept_blocks, self.tail_start_block, self.fresh_block
        if len(row) < fresh + n:
            raise ValueError(f"a row of {len(row)} blocks has no {n} fresh blocks at {fresh}")
        moved = list(row[fresh : fresh + n]) + [filler] * (tail - n) + list(row[tail:fresh]) + list(row[fresh + n :])
        return moved, list(row[:tail])

    def physical_len(self, logical_len: int, epoch: int | None = None) -> int:
        """Tokens attention reads for a request whose logical length is `logical_len`."""
        epoch = self.epoch(logical_len) if epoch is None else epoch
        if epoch < 0:
            return logical_len
        return self.kept_blocks * self.block_size + logical_len - self.tail_block(epoch) * self.block_size

    def physical_row(self, row: list[int], epoch: int = 0) -> list[int]:
        """The block row attention reads in `epoch`: compacted blocks, then the tail blocks."""
        if self.is_noop or epoch < 0:
            return list(row)
        return list(row[: self.kept_blocks]) + list(row[self.tail_block(epoch) :])


def plan_compaction(prompt_len: int, tokens_per_head: int, block_size: int, decode_interval: int = 0) -> Compaction:
    """How many blocks a prompt of `prompt_len` keeps when the policy keeps `tokens_per_head` tokens.

    The tail's T - C tokens count toward the budget; the rest is rounded up to whole blocks (a block
    is the unit of memory, so a partly used compacted block would waste its slots). At least one
    block is kept so that attention sinks survive. If that frees nothing, compaction is a no-op.
    `decode_interval` (tokens, rounded up to whole blocks; 0: never) re-compacts during decode.
    """
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be >= 1")
    full_blocks = prompt_len // block_size
    tail = prompt_len - full_blocks * block_size
    want = max(0, tokens_per_head - tail)
    kept = min(full_blocks, max(1, math.ceil(want / block_size)))
    interval_blocks = math.ceil(decode_interval / block_size) if decode_interval > 0 else 0
    return Compaction(prompt_len, block_size, kept, full_blocks, interval_blocks)


def plan_chunked_compaction(prompt_len: int, tokens_per_head: int, block_size: int, chunk: int) -> Compaction:
    """Per-chunk eviction during prefill (Locret): keep `tokens_per_head` (rounded up to whole blocks)
    after every `chunk` prompt tokens (rounded up to whole blocks) once the prompt outgrows them.

    The first compaction runs at the first chunk boundary past the kept blocks, the last at the last
    boundary inside the prompt; the prompt's remainder after it and everything decoded stay (the
    official Locret leaves its last `local_len` prompt tokens and the decode alone too). A prompt
    that never reaches the first point is a no-op plan.
    """
    if block_size <= 0 or chunk <= 0:
        raise ValueError(f"block_size={block_size} and chunk={chunk} must be >= 1")
    interval = math.ceil(chunk / block_size)
    kept = max(1, math.ceil(tokens_per_head / block_size))
    first = (kept // interval + 1) * interval * block_size  # the first boundary with blocks to free
    full_blocks = prompt_len // block_size
    if first > prompt_len:
        return Compaction(prompt_len, block_size, full_blocks, full_blocks)  # fits: nothing to evict
    last_epoch = (prompt_len - first) // (interval * block_size)
    return Compaction(prompt_len, block_size, kept, first // block_size, interval, first, last_epoch)


def layer_lanes(comp: Compaction, num_kv_heads: int, layer_tokens: int, max_tokens: int) -> int:
    """Head-lanes a layer may use in the ragged layout (`lanes.py`) of `comp`'s n blocks.

    The layer with the most tokens per head (every layer, without a pyramid) uses all n * H_kv lanes:
    exactly the memory of the uniform layout. A pyramid layer with fewer tokens uses proportionally
    fewer lanes (its budget minus the tail, in lanes, at least one per head); the rows are shared by
    all layers, so the request still holds n blocks.
    """
    full = comp.kept_blocks * num_kv_heads
    if layer_tokens >= max_tokens:
        return full
    tail = comp.prompt_len - comp.compactable_tokens
    want = math.ceil(num_kv_heads * max(0, layer_tokens - tail) / comp.block_size)
    return min(full, max(num_kv_heads, want))


def physical_rows(table: torch.Tensor, kept_blocks: torch.Tensor, tail_blocks: torch.Tensor) -> torch.Tensor:
    """`Compaction.physical_row` for many rows at once, on the table's device (no host round trip).

    table [R, M] logical block rows; kept_blocks, tail_blocks [R] (n and C_e / bs of each row's epoch).
    Column c of the result is row[c] for c < n, else row[c + C_e/bs - n]; columns past the end repeat
    the last entry (nothing reads them).
    """
    cols = torch.arange(table.shape[1], device=table.device)
    kept = kept_blocks.to(table.device)[:, None]
    shift = (tail_blocks.to(table.device) - kept_blocks.to(table.device))[:, None]
    src = torch.where(cols < kept, cols, (cols + shift).clamp(max=table.shape[1] - 1))
    return table.gather(1, src)
