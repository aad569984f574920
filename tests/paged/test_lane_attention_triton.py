"""The Triton lane-attention kernel and its batched torch twin (vllm_kvevict.paged.lanes.lane_attention)
against the naive per-request reference (lanes.lane_attention_row).

On CPU this runs under TRITON_INTERPRET=1 (see conftest.py); on a GPU natively."""

from __future__ import annotations

import math

import pytest
import torch

from tests.paged.conftest import DEVICE, kernel_module
from vllm_kvevict.paged.lanes import LaneMap, lane_attention as batched_twin, lane_attention_row as twin


def lane_attention(*args, **kwargs):
    return kernel_module("lane_attention_triton").lane_attention(*args, **kwargs)


def _request(heads, bs, lengths, tail, num_blocks, gen):
    """Random ragged lane map + a permuted block row of compacted + tail blocks."""
    lanes = LaneMap.build(lengths, bs)
    n = lanes.num_blocks
    row = torch.randperm(num_blocks, generator=gen)[: n + math.ceil(tail / bs)]
    return lanes, n, row


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("bs,dim,block_n", [(16, 16, 16), (32, 64, 32), (16, 24, 32)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_matches_twin_on_a_ragged_batch(group, bs, dim, block_n, num_splits):
    gen = torch.Generator().manual_seed(group * 100 + bs + dim)
    heads = 3
    # odd lengths, a head with nothing kept, lengths ending exactly on a lane boundary, a 1-token tail
    reqs = [([5, 0, 2 * bs], 7, 1), ([3 * bs, bs, 1], bs, 3), ([bs + 1, 17, 2 * bs - 1], 1, 1), ([0, 0, 9], 2 * bs + 5, 4)]
    num_blocks = 40
    keys = torch.randn(num_blocks, heads, bs, dim, generator=gen)
    values = torch.randn(num_blocks, heads, bs, dim, generator=gen)
    metas, rows = [], []
    for lengths, tail, nq in reqs:
        metas.append((_request(heads, bs, lengths, tail, num_blocks, gen), tail, nq))
    width = max(len(m[0][2]) for m in metas)
    table = torch.zeros(len(reqs), width, dtype=torch.long)
    q_list, q_req, q_pos = [], [], []
    expected = []
    scale = dim**-0.5
    for r, ((lanes, n, row), tail, nq) in enumerate(metas):
        table[r, : len(row)] = row
        query = torch.randn(nq, heads * group, dim, generator=gen)
        q_list.append(query)
        q_req += [r] * nq
        q_pos += list(range(tail - nq, tail))
        expected.append(twin(query, keys, values, row, lanes, n, tail, scale))
    lane_start = torch.tensor([list(m[0][0].starts) for m in metas])
    head_len = torch.tensor([list(m[0][0].lengths) for m in metas])
    num_comp = torch.tensor([m[0][1] for m in metas])
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = lane_attention(dev(torch.cat(q_list)), dev(keys), dev(values), dev(table), dev(lane_start), dev(head_len),
                         dev(num_comp), dev(torch.tensor(q_req)), dev(torch.tensor(q_pos)), scale, block_n=block_n,
                         num_splits=num_splits)
    tol = 1e-5 if DEVICE == "cpu" else 2e-2  # tf32 dots on GPU
    torch.testing.assert_close(got.cpu(), torch.cat(expected), rtol=tol, atol=tol)
    torch_twin = batched_twin(torch.cat(q_list), keys, values, table, lane_start, head_len, num_comp,
                              torch.tensor(q_req), torch.tensor(q_pos), scale)
    torch.testing.assert_close(torch_twin, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_kernel_reads_a_strided_cpu_layout_view():
    """vLLM's CPU cache: keys transposed per (block, head). The kernel takes the strided view as is."""
    from vllm_kvevict.paged.cache_layout import cpu_views
    gen = torch.Generator().manual_seed(5)
    heads, bs, dim, group = 3, 16, 16, 3
    cache = torch.randn(12, heads, bs, 2 * dim, generator=gen)
    keys, values = cpu_views(cache)
    lanes, n, row = _request(heads, bs, [20, 4, 16], 9, 12, gen)
    query = torch.randn(2, heads * group, dim, generator=gen)
    want = twin(query, keys, values, row, lanes, n, 9, 0.25)
    got = lane_attention(query.to(DEVICE), keys.to(DEVICE) if DEVICE == "cpu" else keys.contiguous().to(DEVICE),
                         values.to(DEVICE), row[None].to(DEVICE), torch.tensor([lanes.starts]).to(DEVICE),
                         torch.tensor([lanes.lengths]).to(DEVICE), torch.tensor([n]).to(DEVICE),
                         torch.tensor([0, 0]).to(DEVICE), torch.tensor([7, 8]).to(DEVICE), 0.25)
    tol = 1e-5 if DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def test_splits_chosen_from_a_host_bound_give_the_same_output():
    gen = torch.Generator().manual_seed(7)
    heads, bs, dim = 2, 16, 16
    keys = torch.randn(30, heads, bs, dim, generator=gen)
    values = torch.randn(30, heads, bs, dim, generator=gen)
    lanes, n, row = _request(heads, bs, [150, 90], 40, 30, gen)
    query = torch.randn(1, heads * 2, dim, generator=gen)
    meta = [row[None], torch.tensor([lanes.starts]), torch.tensor([lanes.lengths]), torch.tensor([n]),
            torch.tensor([0]), torch.tensor([39])]
    one = lane_attention(*(t.to(DEVICE) for t in (query, keys, values, *meta)), 0.25, block_n=16)
    auto = lane_attention(*(t.to(DEVICE) for t in (query, keys, values, *meta)), 0.25, block_n=16, num_splits=None,
                          longest=150 + 40, num_sms=2)  # a tiny device: several splits
    assert kernel_module("lane_attention_triton").choose_splits(1, heads, 190, 16, 2) > 1
    torch.testing.assert_close(auto.cpu(), one.cpu(), rtol=1e-5, atol=1e-5)


def test_choose_splits_fills_the_gpu_without_tiny_splits():
    choose = kernel_module("lane_attention_triton").choose_splits
    assert choose(1, 8, 128 * 1024) == 33  # one decode query: 8 heads x 33 splits >= two waves of 132 SMs
    assert choose(64, 8, 128 * 1024) == 1  # a large batch already fills the GPU
    assert choose(1, 8, 200, block_n=32) == 1  # too short to split into >= 4 tiles each
    assert choose(1, 8, 0) == 1


def test_bad_head_counts_are_refused():
    z = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 KV heads"):
        lane_attention(z, torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), torch.zeros(1, 1), torch.zeros(1, 3),
                       torch.zeros(1, 3), torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0)
