"""Honest counts, computed on the meta device with no weights, in PEFT's printed format."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, get_peft_model

from .tiny import SEVEN

LLAMA_3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def meta_model(shape: dict) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**shape))


def test_llama_3_8b_has_its_published_parameter_count():
    assert sum(p.numel() for p in meta_model(LLAMA_3_8B).parameters()) == 8_030_261_248


@pytest.mark.parametrize("shape, config, trainable, total", [
    (LLAMA_3_8B, dict(r=16, lora_alpha=16, target_modules=SEVEN), 41_943_040, 8_030_261_248 + 41_943_040),
    (LLAMA_3_8B, dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3_407_872, 8_030_261_248 + 3_407_872),
    (SMOLLM2_135M, dict(r=16, lora_alpha=16, target_modules=SEVEN), 4_884_480, 139_399_488),
])
def test_trainable_counts_on_the_meta_device(shape, config, trainable, total):
    model = get_peft_model(meta_model(shape), LoraConfig(**config))
    assert model.get_nb_trainable_parameters() == (trainable, total)
    assert all(p.is_meta for p in model.parameters())


def test_print_trainable_parameters_prints_peft_format(capsys):
    model = get_peft_model(meta_model(SMOLLM2_135M), LoraConfig(r=16, lora_alpha=16, target_modules=SEVEN))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        "trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039\n"
    )


def test_counts_equal_peft_on_a_real_tiny_model():
    import peft
    from .tiny import tiny_llama
    for config in (dict(target_modules=SEVEN + ["embed_tokens"], r=4),
                   dict(target_modules=["q_proj"], r=4, rank_pattern={"layers.0.self_attn.q_proj": 2})):
        ours = get_peft_model(tiny_llama(), LoraConfig(**config)).get_nb_trainable_parameters()
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).get_nb_trainable_parameters()
        assert ours == theirs
