"""Lane attention through vLLM's CPU kernel (integration/vllm/cpu_lanes.py) against the torch twin it
replaces on the CPU path (paged/lanes.py), on CPU_ATTN's real cache layout."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.core.eviction import LaneBatch
from vllm_kvevict.paged.cache_layout import cpu_views
from vllm_kvevict.paged.lanes import lane_attention, lane_sequences

BS, DIM = 32, 64


def ragged_batch(lengths, queries_per_row, tail_pos, seed=0, heads=3, group=3):
    """Rows with lanes of the given per-head lengths (2 compacted blocks each) and a tail; returns the
    cache and lane_attention's arguments."""
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    num_blocks = 8 * rows + 4
    cache = torch.randn(num_blocks, heads, BS, 2 * DIM, generator=g)
    keys, values = cpu_views(cache)
    lens = torch.tensor(lengths)
    lanes = -(-lens // BS)
    starts = torch.cumsum(lanes, 1) - lanes
    table = torch.randperm(num_blocks, generator=g)[: 8 * rows].view(rows, 8).int()
    compacted = -(-lanes.sum(1) // heads)
    req = torch.repeat_interleave(torch.arange(rows), torch.tensor(queries_per_row))
    pos = torch.cat([torch.arange(p - n + 1, p + 1) for n, p in zip(queries_per_row, tail_pos)])
    query = torch.randn(len(req), heads * group, DIM, generator=g)
    return cache, (query, keys, values, table, starts, lens, compacted, req, pos, 0.125)


def lane_batch(args, other_layer=None) -> LaneBatch:
    """The core's step object for `ragged_batch`'s rows: layer 0 = its maps, layer 1 = `other_layer`'s."""
    query, _, _, table, starts, lens, compacted, req, pos, _ = args
    maps = [torch.stack([starts, lens], dim=1)]
    if other_layer is not None:
        maps.append(torch.stack(other_layer, dim=1))
    return LaneBatch(rows=tuple(range(table.shape[0])), lane_maps=torch.stack(maps, dim=1).int(), tables=table,
                     num_compacted=compacted, token_index=torch.arange(query.shape[0]), query_req=req,
                     query_pos=pos, longest=int(lens.sum(1).max() + pos.max() + 1))


@pytest.mark.parametrize("queries_per_row", [[1, 1, 1], [3, 1, 5]])
def test_vllm_kernel_equals_the_twin_on_full_lanes_of_every_layer(queries_per_row):
    """Two layers with different ragged lanes: the sequences of both are built once (the first layer's
    call) and each layer's output equals the twin's."""
    from vllm_kvevict.integration.vllm.cpu_lanes import vllm_lane_attention

    lengths = [[32, 64, 96], [128, 32, 32], [64, 64, 64]]  # whole lanes, ragged across heads
    _, args = ragged_batch(lengths, queries_per_row, tail_pos=[40, 7, 70])
    other = torch.tensor([[96, 64, 32], [32, 32, 128], [32, 96, 64]])
    other_starts = torch.cumsum(other // BS, 1) - other // BS
    batch = lane_batch(args, (other_starts, other))
    assert lane_sequences(*args[3:9], num_kv=3, block_size=BS) is not None
    for layer, (starts, lens) in enumerate([(args[4], args[5]), (other_starts, other)]):
        want = lane_attention(*args[:4], starts, lens, *args[6:])
        got = vllm_lane_attention(args[0], args[1], args[2], batch, layer, 0.125, isa="vec")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert batch.scratch["cpu_lanes"].seq_lens.shape == (2, 9)  # [layers, rows x heads], built once
    one = lane_sequences(*args[3:9], num_kv=3, block_size=BS)
    assert torch.equal(batch.scratch["cpu_lanes"].block_table[0, :, : one.block_table.shape[1]], one.block_table)


def test_a_partial_lane_falls_back_to_the_twin():
    from vllm_kvevict.integration.vllm.cpu_lanes import vllm_lane_attention

    _, args = ragged_batch([[30, 64, 96], [32, 32, 32]], [1, 1], tail_pos=[5, 9])
    assert lane_sequences(*args[3:9], num_kv=3, block_size=BS) is None  # head 0 of row 0: 30 of 32 slots
    got = vllm_lane_attention(args[0], args[1], args[2], lane_batch(args), 0, 0.125, isa="vec")
    torch.testing.assert_close(got, lane_attention(*args))


def test_a_copied_cache_is_not_read_through_the_lane_view():
    from vllm_kvevict.integration.vllm.cpu_lanes import _lane_view

    cache, args = ragged_batch([[32, 32, 32]], [1], tail_pos=[3])
    keys, values = args[1], args[2]
    assert _lane_view(keys, values) is not None
    assert _lane_view(keys.contiguous(), values.contiguous()) is None  # not CPU_ATTN's layout: the twin runs
