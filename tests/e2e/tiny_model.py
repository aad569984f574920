"""A tiny random-weight Llama, made by the tests, for the paths too slow for the real model (Triton's
interpreter runs vLLM's TRITON_ATTN kernels element by element).

GQA 2:1 (4 query heads, 2 KV heads), head_dim 64, 2 layers, the default model's tokenizer (so prompts are
real text), seeded weights drawn wider than a trained model's init (std 0.1, not 0.02) so that greedy
tokens vary and depend on the context (at 0.02 every prompt decodes one repeated token), and KV head 0's
queries sharpened, KV head 1's flattened. Saved as an ordinary Hugging Face directory; nothing is
downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_tiny_llama(directory: Path, default_model: str, layers: int = 2, seed: int = 0) -> Path:
    """Write the model into `directory` (once: an existing one is reused) and return it."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    source = AutoConfig.from_pretrained(default_model)
    config = LlamaConfig(
        vocab_size=source.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rope_parameters=dict(source.rope_parameters), rms_norm_eps=source.rms_norm_eps, tie_word_embeddings=True,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, torch_dtype="float32",
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # KV head 0's query group attends sharply, KV head 1's diffusely (as heads of a
        for layer in model.model.layers:  # trained model differ): Ada-KV then gives them different lanes
            layer.self_attn.q_proj.weight[:128].mul_(3.0)
            layer.self_attn.q_proj.weight[128:].mul_(0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(default_model) / name).is_file():
            shutil.copy(Path(default_model) / name, directory / name)
    return directory
