"""NACL (Chen et al., ACL 2024, arXiv 2408.03675): proxy-token eviction plus random eviction.

Score: the attention the proxy tokens (the last `proxy_ratio` of the prompt, at least one) pay to
every prompt token, summed over the proxies and reduced over each GQA group. Not the paper's: 10% of
each head's scored slots go by those scores max-pooled like SnapKV's (over the 11 tokens up to each),
the rest by the paper's unpooled ones (`pool_share: 0.1`, `attention.share_ranks`; the random sample's
softmax then runs over those ranks). On 2K prompts at 1/4 (docs/results.md, the pool_share ablation)
that keeps the paper's greedy agreement with the full cache (0.32 vs 0.34, n = 24; pooled only: 0.21,
and the quality issue lets no default lose fluency) and retrieves some of the needles the full cache
does at 1/4 (6 of 8 in the ablation, 2 of 6 on the main grid; every one at 1/2), where the paper's
scoring retrieves none even at 1/2 (at 1/8 neither does). `pooling: none` is the paper's;
`pool_share: 1` pools every slot (every needle at 1/8 and 1/4, at that loss of agreement).
Select, per KV head: the top `(1 - random_fraction)` of the head's slots by score, then the rest
sampled without replacement from the remaining candidates with probability softmax(score) (the
reference code's rule, SPEC.md 1.9). Different heads and layers draw different samples
("head-wise diversity"); the generator is seeded from (seed, layer, head), so a plan is reproducible
(preemption recomputes the same cache).

Shapes: view.queries [H_q, P, D] (P proxies), view.keys [H_kv, T, D] -> scores [H_kv, T].
"""

from __future__ import annotations

import math

import torch

from vllm_kvevict.policies.attention import pool_before_recent, share_ranks, window_attention
from vllm_kvevict.policies.declaration import Need
from vllm_kvevict.policies.eviction import EvictionPolicy
from vllm_kvevict.policies.gqa import reduce_groups
from vllm_kvevict.policies.params import (
    GQA_REDUCE, KERNEL_SIZE, MIN_PROMPT_LEN, POOL_ALIGN, Param, decode_interval, pool_share, pooling, sink_tokens)
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.topk import topk_per_head


class NACL(EvictionPolicy):
    name = "nacl"
    description = "proxy-token attention top-k + random sample from the rest; once after prefill"
    param_specs = (
        GQA_REDUCE, MIN_PROMPT_LEN,
        sink_tokens(4),  # [EXT] 256 at 128K prompts; scaled to an 8K model
        Param("proxy_ratio", float, 0.01, "fraction of the prompt's tail used as proxy queries", 1e-6, 1.0),
        # [EXT] 0.12 proxy + 0.07 random of T: 7/19 of the selectable slots are sampled
        Param("random_fraction", float, 0.37, "share of each head's slots filled by random sampling", 0.0, 1.0),
        Param("seed", int, 0, "seed of the random eviction (same seed, same plan)", 0, 2**62),
        # not the paper's: a tenth of the slots by pooled scores (the docstring above)
        pooling("max"), KERNEL_SIZE, POOL_ALIGN, pool_share(0.1),
        decode_interval(),
    )
    needs = frozenset({Need.WINDOW_QUERIES})

    def __init__(self, budget, params):
        super().__init__(budget, params)
        self.proxy_ratio = float(self.params.get("proxy_ratio", 0.01))
        self.random_fraction = float(self.params.get("random_fraction", 0.37))
        self.seed = int(self.params.get("seed", 0))
        self.pooling = str(self.params.get("pooling", "max"))
        self.kernel_size = int(self.params.get("kernel_size", KERNEL_SIZE.default))
        self.pool_align = str(self.params.get("pool_align", POOL_ALIGN.default))
        self.pool_share = float(self.params["pool_share"])

    def num_proxies(self, num_tokens: int) -> int:
        return max(1, min(num_tokens, math.floor(self.proxy_ratio * num_tokens)))

    def query_window(self, num_tokens: int) -> int:
        return self.num_proxies(num_tokens)

    def recent_tokens(self, num_tokens: int) -> int:
        # the proxy tokens (the question at the end of a prompt) are kept themselves
        return self.num_proxies(num_tokens)

    def score(self, view: LayerView) -> torch.Tensor:
        if view.queries is None:
            raise ValueError(f"nacl needs the last {self.num_proxies(view.num_tokens)} prompt queries (view.queries is None)")
        probs = window_attention(view.queries, view.keys, query_start=view.query_start)  # [H_q, P, T]
        summed = probs.sum(dim=1)
        pooled = pool_before_recent(summed, probs.shape[1], self.kernel_size, self.pooling, self.pool_align)
        pooled = reduce_groups(pooled, view.num_kv_heads, self.gqa_reduce)
        if self.pool_share == 1.0 or self.pooling == "none":  # nothing to share
            return pooled
        return share_ranks(pooled, reduce_groups(summed, view.num_kv_heads, self.gqa_reduce), self.pool_share)

    def choose(self, cand_scores: torch.Tensor, counts: list[int], view: LayerView) -> list[torch.Tensor]:
        n_random = [int(round(c * self.random_fraction)) for c in counts]
        proxy = topk_per_head(cand_scores, [c - r for c, r in zip(counts, n_random)])
        out = []
        for h, (picked, r) in enumerate(zip(proxy, n_random)):
            out.append(torch.sort(torch.cat([picked, self._sample(cand_scores[h], picked, r, view.layer, h)])).values)
        return out

    def _sample(self, scores: torch.Tensor, taken: torch.Tensor, n: int, layer: int, head: int) -> torch.Tensor:
        remaining = torch.ones(scores.numel(), dtype=torch.bool)
        remaining[taken] = False
        pool = remaining.nonzero().squeeze(1)
        n = min(n, pool.numel())
        if n <= 0:
            return torch.empty(0, dtype=torch.long)
        probs = random_keep_distribution(scores[pool])
        gen = torch.Generator().manual_seed(self._seed_for(layer, head))
        return pool[torch.multinomial(probs, n, replacement=False, generator=gen)]

    def _seed_for(self, layer: int, head: int) -> int:
        return (self.seed * 1_000_003 + layer * 1_009 + head) % (2**63 - 1)


def random_keep_distribution(scores: torch.Tensor) -> torch.Tensor:
    """NACL's sampling distribution over the remaining candidates: softmax of their scores."""
    return torch.softmax(scores.double(), dim=0)
