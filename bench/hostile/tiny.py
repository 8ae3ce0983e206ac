"""The campaigns' model: a tiny random Llama (hidden 32, 2 layers) with the default model's
tokenizer, so it trains a step in milliseconds and speaks the real chat template (the tests'
`tiny_model_dir` fixture builds the same one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.models import resolve_model_dir

TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template")


def tiny_model(out: Path, *, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Write the model to ``out`` (weights seeded with ``seed``) and return ``out``."""
    source = Path(tokenizer_dir) if tokenizer_dir is not None else resolve_model_dir("smollm2-135m")
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name.startswith(TOKENIZER_FILES):
            shutil.copy(path, out / path.name)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
