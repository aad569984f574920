"""The Triton lane-pack (compaction) kernel against its torch twin (vllm_kvevict.paged.lanes.pack_lanes).

Whole caches are compared after packing, so a kernel that wrote anywhere else, or read a slot after
overwriting it, fails. On CPU under TRITON_INTERPRET=1; on a GPU natively."""

from __future__ import annotations

import pytest
import torch

from tests.paged.conftest import DEVICE, kernel_module
from vllm_kvevict.paged.lanes import LaneMap, pack_lanes as twin


def pack(*args):
    return kernel_module("move_triton").pack_lanes(*args)


def _case(heads, bs, lengths, prompt_blocks, dim, seed, cpu_layout):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = prompt_blocks + 6
    row = torch.randperm(num_blocks, generator=gen)[:prompt_blocks]
    region = prompt_blocks * bs
    # kept positions: ascending, so a head's j-th destination is usually another head's (or its own) source
    kept = [torch.sort(torch.randperm(region, generator=gen)[:n]).values for n in lengths]
    if cpu_layout:  # vLLM's CPU cache: [num_blocks, H_kv, bs, 2*D], keys transposed per (block, head)
        return torch.randn(num_blocks, heads, bs, 2 * dim, generator=gen), row, kept
    return torch.randn(2, num_blocks, heads, bs, dim, generator=gen), row, kept


def _views(cache, cpu_layout):
    if cpu_layout:
        from vllm_kvevict.paged.cache_layout import cpu_views

        return cpu_views(cache)
    return cache[0], cache[1]


@pytest.mark.parametrize("heads,bs,lengths,prompt_blocks,dim", [
    (3, 16, [5, 0, 32], 4, 16),        # a head keeping nothing, a lane-boundary end
    (3, 16, [48, 16, 1], 4, 24),       # odd head size
    (4, 32, [33, 64, 0, 95], 5, 64),
    (1, 16, [17], 3, 16),
    (8, 16, [16, 48, 3, 30, 7, 0, 64, 9], 6, 32),
])
@pytest.mark.parametrize("cpu_layout", [False, True])
def test_kernel_pack_equals_twin(heads, bs, lengths, prompt_blocks, dim, cpu_layout):
    cache, row, kept = _case(heads, bs, lengths, prompt_blocks, dim, seed=heads * 13 + bs + dim, cpu_layout=cpu_layout)
    lanes = LaneMap.build(lengths, bs)
    assert lanes.num_blocks <= prompt_blocks
    want = cache.clone()
    twin(*_views(want, cpu_layout), row, kept, lanes)
    got = cache.clone().to(DEVICE)
    pack(*_views(got, cpu_layout), row.to(DEVICE), [k.to(DEVICE) for k in kept], lanes)
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(want, cache)  # packing moved something


def test_kernel_pack_refuses_mismatched_heads():
    keys = torch.zeros(4, 3, 8, 16)
    with pytest.raises(ValueError, match="the lane map has 2 heads, the cache 3"):
        pack(keys, keys, torch.arange(4), [torch.arange(2)] * 2, LaneMap.build([2, 2], 8))


def test_copy_tokens_moves_exactly_the_addressed_rows():
    mod = kernel_module("move_triton")
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(5, 3, 8, 20, generator=gen)
    dst = torch.zeros(6, 2, 4, 20)
    n = 37
    sa = (torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen),
          torch.randint(0, 8, (n,), generator=gen))
    flat = torch.randperm(6 * 2 * 4, generator=gen)[:n]  # distinct destinations
    da = (flat // 8, (flat // 4) % 2, flat % 4)
    want = dst.clone()
    want[da] = src[sa]
    got = dst.to(DEVICE)
    mod.copy_tokens(src.to(DEVICE), tuple(a.to(DEVICE) for a in sa), got, tuple(a.to(DEVICE) for a in da), block_t=16)
    assert torch.equal(got.cpu(), want)
