"""Tiny models of several architectures, built from transformers config classes, for the planner's
tests: real (random weights, CPU) for saving adapters, or on the meta device for big shapes."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lorakit

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)

# config.json fields of tiny models, one per architecture family the planner knows.
TINY = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **_IDS),
    "llama_bias": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **_IDS),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=90, **_IDS),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                  tie_word_embeddings=True, **_IDS),
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, **_IDS),
    "gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, **_IDS),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **_IDS),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100,
                 **_IDS),
}


def hf_config(fields: dict):
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build(fields: dict, meta: bool = False, seed: int = 0) -> torch.nn.Module:
    """The model a config describes: random weights on CPU, or shapes only on the meta device."""
    config = hf_config(fields)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def write_config(directory: Path, fields: dict) -> Path:
    """A config.json as transformers writes it (every field, defaults included)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(hf_config(fields).to_dict(), indent=2))
    return path


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, as print_trainable_parameters counts them."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# The implementations whose get_peft_model the planner must agree with: PEFT (the reference)
# and lorakit's own.
IMPLEMENTATIONS = {
    "peft": (peft.LoraConfig, peft.get_peft_model),
    "lorakit": (lorakit.LoraConfig, lorakit.get_peft_model),
}
implementations = pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
