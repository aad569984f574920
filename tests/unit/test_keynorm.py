"""keynorm: the smallest-key-norm policy, through the declared interface only (registry, config, plans)."""

from __future__ import annotations

import torch

from vllm_kvevict.core.requests import plan_for
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.declaration import KeptLayout, Need, Trigger
from vllm_kvevict.policies.plan import LayerView
from vllm_kvevict.policies.registry import POLICIES


def _view(seed: int = 0, heads: int = 2, tokens: int = 64, dim: int = 8) -> LayerView:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, tokens, dim, generator=gen) * torch.rand(heads, tokens, 1, generator=gen) * 4
    return LayerView(keys, torch.randn(heads, tokens, dim, generator=gen))


def test_registered_with_its_declaration_and_preset_fields():
    spec = POLICIES["keynorm"]
    assert spec.kind == "evict" and spec.default_budget == 1024
    policy = PolicyConfig.from_dict({"policy": "keynorm", "budget": 16}).build()
    decl = policy.declaration
    assert decl.trigger is Trigger.AFTER_PREFILL and decl.layout is KeptLayout.RECTANGULAR
    assert not decl.needs and Need.WINDOW_QUERIES not in decl  # no query: nothing is captured for it


def test_keeps_each_heads_lowest_norm_keys_plus_the_protected_ones():
    view = _view()
    policy = PolicyConfig.from_dict({"policy": "keynorm", "budget": 20, "recent_tokens": 4, "sink_tokens": 2}).build()
    plan = policy.plan(view)
    norms = view.keys.norm(dim=-1)
    for h, kept in enumerate(plan.indices):
        assert kept.numel() == 20
        protected = torch.cat([torch.arange(2), torch.arange(60, 64)])
        assert set(protected.tolist()) <= set(kept.tolist())
        chosen = torch.tensor(sorted(set(kept.tolist()) - set(protected.tolist())))
        rest = torch.tensor(sorted(set(range(2, 60)) - set(chosen.tolist())))
        assert norms[h, chosen].max() <= norms[h, rest].min()  # 14 lowest norms among the candidates
    assert not torch.equal(plan.indices[0], plan.indices[1])  # heads choose for themselves


def test_paged_plan_keeps_the_block_rules_count_in_every_head():
    plan = plan_for(PolicyConfig.from_dict({"policy": "keynorm", "budget": 256}), 1947, 128, 30)
    assert (plan.compaction.kept_blocks, plan.compaction.freed_blocks) == (2, 13)
    policy = plan.policy
    rect = policy.plan_rect(_view(1, tokens=300), region=256, keep=128)
    assert rect.lengths == [128, 128] and all(int(ix.max()) < 256 for ix in rect.indices)


def test_served_listed_and_in_the_eval_and_capacity_defaults():
    from vllm_kvevict.bench.capacity import CapacitySpec
    from vllm_kvevict.cli.policies_cmd import describe_all
    from vllm_kvevict.eval.runner import EvalSpec
    from vllm_kvevict.integration.vllm.settings import check_servable

    check_servable(PolicyConfig.from_dict({"policy": "keynorm"}), eager=False)  # no hooks: compiled models too
    assert "keynorm" in [row["name"] for row in describe_all()]
    assert "keynorm" in EvalSpec().policies and "keynorm" in CapacitySpec().policies
