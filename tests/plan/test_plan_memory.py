"""The memory model is explicit: its parts are the documented formula and sum to the total.
(The check against a measured training peak waits for the trainer.)"""

import json

import peft
import pytest
import torch

import lorakit.plan.memory as memory
from lorakit.errors import ConfigError
from lorakit.plan import estimate

from .tiny import SEVEN, TINY, build, write_config

GiB = 1024 ** 3


def test_parts_follow_the_documented_formula(tmp_path):
    # Tiny Llama: hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads (kv dim 16), vocab 100.
    e = estimate(write_config(tmp_path, TINY["llama"]), r=4, target_modules=SEVEN,
                 batch_size=2, seq_len=10, dtype="bfloat16", device="cpu")
    m = e.memory
    block = 2 * (4 * 32 + 4) + 2 * (2 * 32 + 2 * 16) + 4 * 4 + 3 * 64 * 2
    lora = 6 * 4 * 32 + 4 * 64 + 7 * 4 * 4  # fp32 input copies (six read 32, down reads 64), x·A
    final_norm = 4 * 32 + 4
    assert m.activation_bytes_per_token == 2 * block + 2 * lora + final_norm
    assert m.weights == e.base_params * 2
    assert m.adapter == e.trainable_params * 16
    assert m.activations == 2 * 10 * (2 * block + 2 * lora + final_norm)
    assert m.logits == 2 * 10 * 100 * (2 + 12)
    assert m.overhead == GiB // 2
    assert m.total == sum(m.parts().values())


def test_float32_keeps_a_shared_input_once(tmp_path):
    e = estimate(write_config(tmp_path, TINY["llama"]), r=4, target_modules=SEVEN,
                 batch_size=1, seq_len=10, dtype="float32")
    block = 2 * (4 * 32 + 4) + 4 * (2 * 32 + 2 * 16) + 4 * 4 + 3 * 64 * 4
    lora = (4 * 32) * 3 + 4 * 64 + 7 * 4 * 4  # q/k/v share one input, gate/up another, o, down
    assert e.memory.activation_bytes_per_token == 2 * block + 2 * lora + 4 * 32 + 4


def test_checkpointing_keeps_block_inputs_and_one_recomputed_block(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    plain = estimate(config, r=4, target_modules=SEVEN, gradient_checkpointing=False).memory
    ckpt = estimate(config, r=4, target_modules=SEVEN, gradient_checkpointing=True).memory
    block = 2 * (4 * 32 + 4) + 2 * (2 * 32 + 2 * 16) + 4 * 4 + 3 * 64 * 2
    lora = 6 * 4 * 32 + 4 * 64 + 7 * 4 * 4
    assert ckpt.activation_bytes_per_token == 2 * 32 * 2 + block + lora + 4 * 32 + 4
    assert ckpt.activations < plain.activations
    assert (ckpt.weights, ckpt.adapter, ckpt.logits) == (plain.weights, plain.adapter, plain.logits)


def test_dropout_keeps_a_mask_for_each_adapted_input(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    without = estimate(config, r=4, target_modules=["q_proj", "down_proj"]).memory
    with_dropout = estimate(config, r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.1).memory
    masks = 2 * 4 * (32 + 64)  # q_proj reads 32 values, down_proj 64; fp32 masks; 2 layers
    assert with_dropout.activation_bytes_per_token - without.activation_bytes_per_token == masks


def test_blocks_before_the_first_adapted_one_keep_nothing(tmp_path):
    config = write_config(tmp_path, TINY["llama_bias"])  # 3 layers
    last = estimate(config, r=4, target_modules=SEVEN, layers_to_transform=[2]).memory
    every = estimate(config, r=4, target_modules=SEVEN).memory
    per_layer_lora = (every.activation_bytes_per_token - last.activation_bytes_per_token)
    assert per_layer_lora > 0
    head_only = estimate(config, r=4, target_modules=["lm_head"]).memory
    assert head_only.activation_bytes_per_token == 4 * 32 + 4 + 4 * 32 + 4 * 4  # final norm, head


# Saved-tensor bytes per token, measured with autograd's saved_tensors_hooks in a real forward
# pass through transformers' blocks with PEFT's LoRA layers (which, like lorakit's, compute the
# adapter in fp32). The logits' share is left out: it is a separate part of the estimate.
MEASURE = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
    "qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300),
    "gemma2": dict(model_type="gemma2", hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300),
    "phi3": dict(model_type="phi3", hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0),
}
PHI3 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def saved_bytes_per_token(fields, settings, dtype, seq_len, checkpointing=False):
    model = build(fields).to(dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(**settings)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t
        return t

    ids = torch.randint(0, fields["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    kept = [t for t in seen.values()  # leave out the loss: labels, log-softmax, scalars
            if t.shape[-1:] != (fields["vocab_size"],) and t.dtype != torch.int64 and t.dim()]
    return sum(t.untyped_storage().nbytes() for t in kept) / seq_len


@pytest.mark.parametrize("arch, settings, dtype, seq_len", [
    ("llama", dict(r=16, target_modules=SEVEN), "bfloat16", 64),
    ("llama", dict(r=16, target_modules=["q_proj", "v_proj"]), "bfloat16", 64),
    ("llama", dict(r=16, target_modules=SEVEN), "float32", 64),
    ("llama", dict(r=16, target_modules=SEVEN, lora_dropout=0.1), "bfloat16", 64),
    ("llama", dict(r=8, target_modules=SEVEN, layers_to_transform=[2]), "bfloat16", 64),
    ("qwen3", dict(r=8, target_modules=SEVEN), "bfloat16", 64),
    ("gemma2", dict(r=8, target_modules=SEVEN), "bfloat16", 64),
    ("gemma2", dict(r=8, target_modules=SEVEN), "bfloat16", 128),
    ("phi3", dict(r=8, target_modules=PHI3), "bfloat16", 64),
])
def test_activations_are_what_autograd_saves(arch, settings, dtype, seq_len, tmp_path):
    measured = saved_bytes_per_token(MEASURE[arch], settings, getattr(torch, dtype), seq_len)
    planned = estimate(write_config(tmp_path, MEASURE[arch]), **settings, dtype=dtype,
                       seq_len=seq_len).memory.activation_bytes_per_token
    assert measured <= planned <= 1.1 * measured


def test_checkpointing_saves_only_block_inputs(tmp_path):
    fields, settings = MEASURE["llama"], dict(r=16, target_modules=SEVEN)
    measured = saved_bytes_per_token(fields, settings, torch.bfloat16, 64, checkpointing=True)
    assert measured == 3 * 128 * 2 + 4 * 128 + 4  # each block's bf16 input, the final norm's


def test_estimate_matches_the_live_peak_of_a_training_step(tmp_path):
    """Live tensors at the peak of a real step (PyTorch's memory profiler), against the estimate
    without the runtime overhead. (Peak RSS of a whole run is the trainer's test.)"""
    fields = dict(MEASURE["llama"], hidden_size=256, intermediate_size=640, vocab_size=4000,
                  tie_word_embeddings=True)
    settings = dict(r=16, lora_alpha=16, target_modules=SEVEN)
    model = peft.get_peft_model(build(fields).to(torch.bfloat16), peft.LoraConfig(**settings)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on, as in every later step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    path = tmp_path / "timeline.json"
    prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())
    live_peak = max(sum(s) for s in sizes)
    m = estimate(write_config(tmp_path, fields), **settings, batch_size=4, seq_len=128).memory
    assert live_peak <= m.total - m.overhead <= 1.1 * live_peak


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
