"""The oracle: after compaction, vLLM's next-token log-probabilities equal the default model's in
transformers when each (layer, KV head) attends only to the tokens the policy kept for it.

    vLLM (our CPU path)     prompt -> compaction -> greedy decode, log-probs of each step's top tokens,
                            and the kept positions every (layer, KV head) reports (`KeptLog`)
    transformers (eager)    prompt + the same generated tokens in one forward; prompt rows attend
                            causally (the prefill saw everything), decode rows of layer l, query head q
                            attend to kept[l][q // G] + the tail [C, row] (C: the prompt's last block
                            boundary, where the uncompacted tail starts)

If they agree to fp32 precision, what a policy keeps is exactly what attention reads: no slot, lane or
tail mistake, and a bad score is the method's. Every policy that compacts once after prefill runs on
two real prompts (per-chunk Locret and selecting TokenSelect have their own paths).
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.engine import BLOCK, long_prompt, model_path, run_path
from vllm_kvevict.policies.declaration import Trigger

pytestmark = pytest.mark.e2e

BUDGET = 128
MAX_TOKENS = 4
TOP = 5
TOL = 2e-4  # |log p| difference allowed (fp32 on both sides, different kernels)


def after_prefill_policies() -> list[str]:
    from vllm_kvevict.policies.config import PolicyConfig
    from vllm_kvevict.policies.registry import names

    return [n for n in names("evict") if PolicyConfig(n).build().declaration.trigger is Trigger.AFTER_PREFILL]


@pytest.fixture(scope="module")
def oracle_run():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    prompts = [long_prompt(tok, 900), long_prompt(tok, 900, offset=6000, question="Summarize the text above.")]
    policies = ["none"] + after_prefill_policies()
    requests = [{"id": f"{p}/{k}", "prompt": text, "max_tokens": MAX_TOKENS, "logprobs": TOP,
                 "xargs": {"kv_policy": p} if p == "none" else {"kv_policy": p, "kv_budget": BUDGET}}
                for p in policies for k, text in enumerate(prompts)]
    engine = {"dtype": "float32", "enforce_eager": True, "block_size": BLOCK, "max_model_len": 1280, "seed": 0,
              "enable_prefix_caching": False, "num_gpu_blocks_override": 200, "max_num_batched_tokens": 1024,
              "additional_config": {"kv_evict": {"policy": "none"}}}
    report = run_path("cpu", {"model": model_path(), "engine": engine, "requests": requests})
    return report, report["prompt_ids"], policies


class KeptMaskAttention:
    """An eager attention for transformers whose allowed keys come from per-layer masks [H_q, L, L]."""

    def __init__(self) -> None:
        self.masks: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~self.masks[module.layer_idx][None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AttentionInterface, AutoModelForCausalLM

    attention = KeptMaskAttention()
    AttentionInterface.register("kvevict_kept_mask", attention)
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32,
                                                 attn_implementation="kvevict_kept_mask").eval()
    return model, attention


def masks_for(kept: dict[str, list[list[int]]] | None, prompt_len: int, total: int, num_layers: int,
              num_q: int, num_kv: int) -> dict[int, torch.Tensor]:
    """Per layer [H_q, L, L]: causal for prompt rows; decode rows read kept[layer][kv head] + [C, row]."""
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    tail = (prompt_len // BLOCK) * BLOCK
    masks = {}
    for layer in range(num_layers):
        mask = causal[None].repeat(num_q, 1, 1)
        if kept is not None:
            for q in range(num_q):
                allowed = torch.zeros(total, dtype=torch.bool)
                allowed[torch.tensor(kept[str(layer)][q // (num_q // num_kv)], dtype=torch.long)] = True
                mask[q, prompt_len:, :tail] = allowed[:tail]
        masks[layer] = mask
    return masks


def hf_logprobs(hf_model, ids: list[int], generated: list[int], kept) -> torch.Tensor:
    """log-softmax over the vocabulary at the rows that predict each generated token [MAX_TOKENS, V]."""
    model, attention = hf_model
    cfg = model.config
    tokens = ids + generated[:-1]
    attention.masks = masks_for(kept, len(ids), len(tokens), cfg.num_hidden_layers, cfg.num_attention_heads,
                                cfg.num_key_value_heads)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, len(ids) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def max_diff(vllm_steps: list[dict[str, float]], ref: torch.Tensor) -> float:
    return max(abs(lp - float(ref[i, int(t)])) for i, step in enumerate(vllm_steps) for t, lp in step.items())


def test_vllm_after_compaction_equals_transformers_attending_to_the_kept_tokens(oracle_run, hf_model):
    report, ids, policies = oracle_run
    layers = hf_model[0].config.num_hidden_layers
    diffs, full_diffs = {}, {}
    for rid, steps in report["logprobs"].items():
        policy = rid.split("/")[0]
        generated = report["outputs"][rid]
        assert len(generated) == len(steps) == MAX_TOKENS
        kept = report.get("kept", {}).get(rid)
        if policy != "none":
            assert kept is not None and len(kept) == layers, (rid, "every layer compacted")
            assert all(len(heads) == hf_model[0].config.num_key_value_heads for heads in kept.values())
        diffs[rid] = max_diff(steps, hf_logprobs(hf_model, ids[rid], generated, kept))
        if policy != "none":  # the same tokens with nothing evicted: the mask must matter
            full_diffs[rid] = max_diff(steps[1:], hf_logprobs(hf_model, ids[rid], generated, None)[1:])
    assert set(r.split("/")[0] for r in diffs) == set(policies)
    assert max(diffs.values()) < TOL, {r: f"{d:.2e}" for r, d in diffs.items() if d >= TOL}
    assert min(full_diffs.values()) > 10 * TOL, {r: f"{d:.2e}" for r, d in full_diffs.items()}
