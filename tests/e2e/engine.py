"""Helpers for the end-to-end tests that run the default model in real vLLM (in-process engine core).

`make_llm` builds an LLM with the CPU settings of DESIGN.md section 2. `run_steps` drives the
engine step by step so a test can look at the scheduler and block pool between steps.
`stock_generate` runs the same requests in a fresh process with our plugin disabled
(VLLM_PLUGINS=""), the reference "stock vLLM" output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: inspectable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

BLOCK = 128
ENGINE: dict[str, Any] = dict(dtype="float32", enforce_eager=True, block_size=BLOCK, seed=0)
# A pool of 20 blocks (19 usable next to the null block): one ~2K prompt (16 blocks) at a time
# without eviction, two at once with it. Prefill in 256-token chunks (chunked prefill exercised).
SMALL_POOL: dict[str, Any] = dict(num_gpu_blocks_override=20, max_model_len=2304, max_num_batched_tokens=256)
QUESTION = "What programming language is the text above about? Explain in a few sentences."


def model_path() -> str:
    from vllm_kvevict.models.smollm2 import prepare_default_model

    return str(prepare_default_model(progress=False))


def make_llm(policy: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(ENGINE, max_model_len=4096)
    args.update(kwargs)
    if policy is not None:
        args["additional_config"] = {"kv_evict": policy}
    return LLM(model_path(), **args)


def long_prompt(tokenizer, context_tokens: int = 1900, question: str = QUESTION, offset: int = 0) -> str:
    """A chat prompt: `context_tokens` tokens of Python's reference docs, then a question."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values())
    ids = tokenizer(text)["input_ids"][offset : offset + context_tokens]
    messages = [{"role": "user", "content": tokenizer.decode(ids) + "\n\n" + question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fluent(text: str) -> bool:
    """At least 15 words, at least half of them distinct: an answer, not a loop (a short one fails too)."""
    words = text.split()
    return len(words) >= 15 and len(set(words)) >= len(words) // 2


def greedy(max_tokens: int = 40, **extra_args):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args or None)


def engine_core(llm):
    return llm.llm_engine.engine_core.engine_core


def scheduler(llm):
    return engine_core(llm).scheduler


def free_blocks(llm) -> int:
    return scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def held_blocks(llm, request_id: str) -> int:
    """Real (non-null) blocks a request (added as `request_id`) holds in the scheduler."""
    request = find_request(llm, request_id)
    if request is None:
        return 0
    manager = scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]
    return sum(1 for b in manager.req_to_blocks.get(request.request_id, ()) if not b.is_null)


def run_steps(llm, requests: list[tuple[str, str, Any]], on_step: Callable[[int], None] | None = None,
              max_steps: int = 2000) -> dict[str, list[int]]:
    """Add the requests, step the engine to completion; returns request id -> generated token ids."""
    engine = llm.llm_engine
    ids = {engine.add_request(rid, prompt, params): rid for rid, prompt, params in requests}
    out: dict[str, list[int]] = {}
    for step in range(max_steps):
        for output in engine.step():
            if output.finished:
                out[ids.get(output.request_id, output.request_id)] = list(output.outputs[0].token_ids)
        if on_step is not None:
            on_step(step)
        if not engine.has_unfinished_requests():
            return out
    raise AssertionError(f"requests did not finish in {max_steps} steps")


def find_request(llm, request_id: str):
    """The scheduler's live Request added as `request_id` (vLLM appends a suffix), or None."""
    for rid, request in scheduler(llm).requests.items():
        if rid == request_id or rid.startswith(request_id + "-"):
            return request
    return None


def generate_in_subprocess(prompts: list[str], max_tokens: int = 40, stock: bool = True,
                           **engine_kwargs) -> list[list[int]]:
    """Greedy token ids from a fresh process: stock vLLM (our plugin not loaded) or with our plugin.

    A second LLM in this process would share (and on shutdown tear down) vLLM's process-global
    parallel state, so every other engine runs in its own process."""
    spec = {"engine": {**ENGINE, "max_model_len": 4096, **engine_kwargs}, "prompts": prompts,
            "max_tokens": max_tokens, "model": model_path(), "stock": stock}
    env = dict(os.environ)
    if stock:
        env["VLLM_PLUGINS"] = ""  # load no general plugin: vLLM as shipped
    else:
        env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("generate_main.py"))],
                          input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stock_generate(prompts: list[str], max_tokens: int = 40, **engine_kwargs) -> list[list[int]]:
    return generate_in_subprocess(prompts, max_tokens, stock=True, **engine_kwargs)


def retrieval_samples(tok, context: int):
    """Passkey and needle prompts of exactly `context` tokens (the eval's generators). At 4K the default
    model retrieves these needles with the full cache, but no passkey (measured: 0 of 15 filler passkeys
    and 0 of 9 in natural text, several phrasings); the passkeys count only where the full cache succeeds."""
    from vllm_kvevict.eval.tasks import hf_builder, make_sample

    builder = hf_builder(tok)
    return [make_sample(builder, "niah", context, 0.8, 0, seed=1), make_sample(builder, "niah", context, 0.8, 0, seed=2),
            make_sample(builder, "passkey", context, 0.5, 0, seed=1), make_sample(builder, "passkey", context, 0.2, 0, seed=1)]


def run_path(path: str, spec: dict) -> dict:
    """`paths_main.py` in a fresh process (the Triton shims, when on a CPU, must precede vLLM's import)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env.pop("VLLM_PLUGINS", None)
    if path == "stock-triton":
        env["VLLM_PLUGINS"] = ""  # vLLM as shipped (its TritonAttentionBackend is put in the CPU_ATTN slot)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("paths_main.py"))],
                          input=json.dumps({**spec, "path": path}), capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
