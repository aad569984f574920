"""The CUDA path on a GPU, natively (needs a CUDA GPU and the CUDA build of vLLM; skipped elsewhere).

The same code runs on every CPU machine under Triton's interpreter in tests/e2e/test_triton_path.py,
compared request by request with the CPU path; here the default model runs through our TRITON_ATTN
backend at full speed: every policy compacts to the rule's blocks and answers the question, `none` is
token-identical to stock vLLM, and vLLM's default compilation (piecewise CUDA graphs, attention eager)
gives the tokens eager execution gives.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.engine import QUESTION, long_prompt, model_path
from tests.e2e.test_triton_path import run_path
from vllm_kvevict.core.requests import plan_for
from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.registry import names

pytestmark = [pytest.mark.gpu, pytest.mark.e2e,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU twin: test_triton_path)")]

BLOCK, BUDGET = 16, 256


@pytest.fixture(scope="module")
def prompt():
    from transformers import AutoTokenizer

    return long_prompt(AutoTokenizer.from_pretrained(model_path()), 1900, QUESTION)


def _spec(prompt: str, policies: list[str], eager: bool = True) -> dict:
    requests = [{"id": p, "prompt": prompt, "max_tokens": 40,
                 "xargs": {"kv_policy": p} if p == "none" else {"kv_policy": p, "kv_budget": BUDGET}} for p in policies]
    engine = {"dtype": "bfloat16", "enforce_eager": eager, "block_size": BLOCK, "max_model_len": 4096, "seed": 0,
              "enable_prefix_caching": False, "gpu_memory_utilization": 0.5,
              "additional_config": {"kv_evict": {"policy": "none"}}}
    return {"model": model_path(), "engine": engine, "requests": requests}


def test_every_policy_compacts_by_the_rule_and_answers(prompt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    report = run_path("triton", _spec(prompt, names()))
    assert report["backend"].endswith("KVEvictTritonBackend")
    prompt_len = len(tok(prompt)["input_ids"])
    for policy in names():
        text = tok.decode(report["outputs"][policy], skip_special_tokens=True)
        assert "Python" in text, (policy, text)
        comp = plan_for(PolicyConfig.from_dict({"policy": policy, "budget": BUDGET}), prompt_len, BLOCK, 30).compaction
        if comp is not None and not comp.is_noop:
            assert min(report["held"][policy]) <= comp.kept_blocks + comp.interval_blocks + 2, policy
    assert report["free"][0] == report["free"][1]


def test_none_is_stock_and_cuda_graphs_change_no_token(prompt):
    ours = run_path("triton", _spec(prompt, ["none", "snapkv", "ada-snapkv"]))
    stock = run_path("stock-triton", _spec(prompt, ["none"]))
    assert ours["outputs"]["none"] == stock["outputs"]["none"]
    graphs = run_path("triton", _spec(prompt, ["none", "snapkv", "ada-snapkv"], eager=False))
    assert graphs["outputs"] == ours["outputs"]
