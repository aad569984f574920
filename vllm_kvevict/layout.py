"""Block arithmetic of a compacted request, shared by the scheduler and the worker.

Both sides must agree on how many blocks a request keeps without talking, so the rule is a pure
function of (prompt length, policy, block size, layers). Pure python + the policy library.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Compaction:
    """The outcome of compacting one request's prompt (all in tokens / logical blocks)."""

    prompt_len: int
    block_size: int
    kept_blocks: int  # n: blocks of the compacted region
    tail_start_block: int  # C / bs: first logical block of the tail

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

    def physical_len(self, logical_len: int) -> int:
        """Tokens attention reads for a request whose logical length is `logical_len`."""
        if self.is_noop:
            return logical_len
        return logical_len - self.freed_blocks * self.block_size

    def physical_row(self, row: list[int]) -> list[int]:
        """The block row attention reads: compacted blocks, then the tail blocks."""
        if self.is_noop:
            return list(row)
        return list(row[: self.kept_blocks]) + list(row[self.tail_start_block :])


def plan_compaction(prompt_len: int, tokens_per_head: int, block_size: int) -> Compaction:
    """How many blocks a prompt of `prompt_len` keeps when the policy keeps `tokens_per_head` tokens.

    The tail's T - C tokens count toward the budget; the rest is rounded up to whole blocks (a block
    is the unit of memory, so a partly used compacted block would waste its slots). At least one
    block is kept so that attention sinks survive. If that frees nothing, compaction is a no-op.
    """
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be >= 1")
    full_blocks = prompt_len // block_size
    tail = prompt_len - full_blocks * block_size
    want = max(0, tokens_per_head - tail)
    kept = min(full_blocks, max(1, math.ceil(want / block_size)))
    return Compaction(prompt_len, block_size, kept, full_blocks)
