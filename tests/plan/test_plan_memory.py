"""The memory model is explicit: its parts are the documented formula and sum to the total.
(The check against a measured training peak waits for the trainer.)"""

import pytest

import lorakit.plan.memory as memory
from lorakit.errors import ConfigError
from lorakit.plan import estimate

from .tiny import SEVEN, TINY, write_config

GiB = 1024 ** 3


def test_parts_follow_the_documented_formula(tmp_path):
    # Tiny Llama: hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads (kv dim 16), vocab 100.
    e = estimate(write_config(tmp_path, TINY["llama"]), r=4, target_modules=SEVEN,
                 batch_size=2, seq_len=10, dtype="float32", device="cpu")
    m = e.memory
    block = (32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32) + 4 * 32
    lora = 4 * 7 * 2  # r per targeted module, 7 modules in each of 2 layers
    assert m.activation_values_per_token == 2 * block + lora
    assert m.weights == e.base_params * 4
    assert m.adapter == e.trainable_params * 16
    assert m.activations == 2 * 10 * 4 * (2 * block + lora)
    assert m.logits == 2 * 10 * 100 * (4 + 8)
    assert m.overhead == GiB // 2
    assert m.total == sum(m.parts().values())


def test_checkpointing_keeps_one_block_plus_block_inputs(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    plain = estimate(config, r=4, target_modules=SEVEN, gradient_checkpointing=False).memory
    ckpt = estimate(config, r=4, target_modules=SEVEN, gradient_checkpointing=True).memory
    block = (plain.activation_values_per_token - 4 * 7 * 2) // 2
    assert ckpt.activation_values_per_token == 2 * 32 + block + 4 * 7
    assert ckpt.activations < plain.activations
    assert (ckpt.weights, ckpt.adapter, ckpt.logits) == (plain.weights, plain.adapter, plain.logits)


def test_dropout_keeps_a_copy_of_each_adapted_input(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    without = estimate(config, r=4, target_modules=["q_proj", "down_proj"]).memory
    with_dropout = estimate(config, r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.1).memory
    inputs = 2 * (32 + 64)  # q_proj reads hidden (32), down_proj reads the MLP width (64); 2 layers
    assert with_dropout.activation_values_per_token - without.activation_values_per_token == inputs


def test_memory_scales_with_tokens_and_dtype():
    small = estimate("Llama-3-8B", r=16, target_modules=SEVEN, batch_size=1, seq_len=512).memory
    big = estimate("Llama-3-8B", r=16, target_modules=SEVEN, batch_size=4, seq_len=1024).memory
    assert big.activations == 8 * small.activations and big.logits == 8 * small.logits
    fp32 = estimate("Llama-3-8B", r=16, target_modules=SEVEN, batch_size=1, seq_len=512,
                    dtype="float32").memory
    assert fp32.weights == 2 * small.weights
    assert 14.9 * GiB < small.weights < 15.0 * GiB  # 8.03e9 parameters in bf16


def test_fits_compares_with_the_stated_memory():
    assert estimate("SmolLM2-135M", memory_gb=None).memory.fits is None
    assert estimate("SmolLM2-135M", memory_gb=64).memory.fits is True
    assert estimate("Llama-3-8B", memory_gb=16, device="cuda").memory.fits is False


def test_bad_training_settings_are_reported_together():
    with pytest.raises(ConfigError) as err:
        estimate("SmolLM2-135M", batch_size=0, dtype="int4", device="tpu", memory_gb=-1)
    for word in ("batch_size=0", "dtype='int4'", "device='tpu'", "memory_gb=-1"):
        assert word in str(err.value)


def test_the_formula_is_in_the_docstring():
    assert "total = weights + adapter + activations + logits + overhead" in memory.__doc__
