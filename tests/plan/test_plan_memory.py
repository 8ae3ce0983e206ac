"""The memory model is explicit: its parts are the documented formula and sum to the total;
its activation and logits terms are what autograd keeps, in transformers' models with PEFT and in
lorakit's trainer step. (Peak RSS of real training runs: test_plan_peak_rss.py.)"""

import json
import math

import peft
import pytest
import torch

import lorakit.plan.memory as memory
import lorakit
from lorakit.errors import ConfigError
from lorakit.evaluation import loss_sum
from lorakit.plan import estimate
from lorakit.train.fast import speed_up

from .tiny import SEVEN, TINY, build, write_config

GiB = 1024 ** 3


def test_parts_follow_the_documented_formula(tmp_path):
    # Tiny Llama: hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads (kv dim 16), vocab 100.
    # The defaults are lorakit's trainer: bf16 autocast, the head on label positions only.
    e = estimate(write_config(tmp_path, TINY["llama"]), r=4, target_modules=SEVEN,
                 batch_size=2, seq_len=10, dtype="bfloat16", device="cpu", label_fraction=0.25)
    m = e.memory
    # lorakit's kernels: fused norms keep bf16 inputs, attention its probabilities (10 keys: seq < 64)
    block = 2 * (2 * 32 + 4) + 2 * (2 * 32 + 2 * 16) + 2 * 4 * 10 + 3 * 64 * 2
    lora = 3 * 2 * 32 + 2 * 64 + 7 * 2 * 4  # bf16 inputs kept once per shared input: q/k/v, o, gate/up;
    final_norm = 2 * 32 + 4                 # down reads 64; x·A
    assert m.activation_bytes_per_token == 2 * block + 2 * lora + final_norm
    assert m.weights == e.base_params * 2
    assert m.adapter == e.trainable_params * (16 + 2)  # fp32 state, the bf16 copies autocast keeps
    assert m.activations == 2 * 10 * (2 * block + 2 * lora + final_norm)
    assert m.logits == 5 * 100 * (4 + 2) + 2 * 5 * 32 * 2  # 5 of 20 positions labelled: one chunk; h, dL/dh
    assert m.allocator == math.ceil(0.35 * m.activations)  # glibc's slack on CPU
    assert m.overhead == GiB // 2
    assert m.total == sum(m.parts().values())
    assert (m.autocast, m.head_on_labels, m.label_fraction) == (True, True, 0.25)


def test_without_autocast_adapters_keep_fp32_and_a_full_head_keeps_its_logits(tmp_path):
    e = estimate(write_config(tmp_path, TINY["llama"]), r=4, target_modules=SEVEN,
                 batch_size=2, seq_len=10, dtype="bfloat16", device="cuda", autocast=False,
                 head_on_labels=False, label_fraction=0.25)
    m = e.memory
    block = 2 * (4 * 32 + 4) + 2 * (2 * 32 + 2 * 16) + 4 * 4 + 3 * 64 * 2
    lora = 6 * 4 * 32 + 4 * 64 + 7 * 4 * 4  # fp32 input copies, fp32 x·A
    assert m.activation_bytes_per_token == 2 * block + 2 * lora + 4 * 32 + 4
    assert m.adapter == e.trainable_params * 16
    assert m.logits == 2 * 10 * 100 * (2 + 12)  # every position, whatever the labels
    assert (m.allocator, m.overhead) == (0, GiB)
    assert m.total == sum(m.parts().values())


def test_the_head_runs_on_labels_for_the_architectures_the_trainer_does_it_for(tmp_path):
    llama = estimate(write_config(tmp_path / "llama", TINY["llama"]), r=4).memory
    gpt2 = estimate(write_config(tmp_path / "gpt2", TINY["gpt2"]), r=4).memory
    assert llama.head_on_labels and not gpt2.head_on_labels


def test_float32_keeps_a_shared_input_once(tmp_path):
    e = estimate(write_config(tmp_path, TINY["llama"]), r=4, target_modules=SEVEN,
                 batch_size=1, seq_len=10, dtype="float32")
    block = 2 * (4 * 32 + 4) + 4 * (2 * 32 + 2 * 16) + 4 * 4 * 10 + 3 * 64 * 4
    lora = (4 * 32) * 3 + 4 * 64 + 7 * 4 * 4  # q/k/v share one input, gate/up another, o, down
    assert e.memory.activation_bytes_per_token == 2 * block + 2 * lora + 4 * 32 + 4


def test_checkpointing_keeps_block_inputs_and_one_recomputed_block(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    plain = estimate(config, r=4, target_modules=SEVEN, gradient_checkpointing=False).memory
    ckpt = estimate(config, r=4, target_modules=SEVEN, gradient_checkpointing=True).memory
    keys = (256 * 256 + 256 * 512) // 512  # 512 tokens: the first half of the queries sees 256 keys
    block = 2 * (2 * 32 + 4) + 2 * (2 * 32 + 2 * 16) + 2 * 4 * keys + 3 * 64 * 2
    lora = 3 * 2 * 32 + 2 * 64 + 7 * 2 * 4
    assert ckpt.activation_bytes_per_token == 2 * 32 * 2 + block + lora + 2 * 32 + 4
    assert ckpt.activations < plain.activations
    assert (ckpt.weights, ckpt.adapter, ckpt.logits) == (plain.weights, plain.adapter, plain.logits)


def test_dropout_keeps_a_mask_for_each_adapted_input(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    without = estimate(config, r=4, target_modules=["q_proj", "down_proj"]).memory
    with_dropout = estimate(config, r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.1).memory
    masks = 2 * 2 * (32 + 64)  # q_proj reads 32 values, down_proj 64; bf16 masks; 2 layers
    assert with_dropout.activation_bytes_per_token - without.activation_bytes_per_token == masks


def test_blocks_before_the_first_adapted_one_keep_nothing(tmp_path):
    config = write_config(tmp_path, TINY["llama_bias"])  # 3 layers
    last = estimate(config, r=4, target_modules=SEVEN, layers_to_transform=[2]).memory
    every = estimate(config, r=4, target_modules=SEVEN).memory
    per_layer_lora = (every.activation_bytes_per_token - last.activation_bytes_per_token)
    assert per_layer_lora > 0
    head_only = estimate(config, r=4, target_modules=["lm_head"]).memory
    assert head_only.activation_bytes_per_token == 2 * 32 + 4 + 2 * 32 + 2 * 4  # final norm, head


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


def peft_model(fields, settings, dtype):
    """transformers' model cast to ``dtype`` with PEFT's LoRA, called with labels= (no autocast)."""
    model = peft.get_peft_model(build(fields).to(dtype), peft.LoraConfig(**settings)).train()
    return model, lambda batch: model(**batch).loss


def trainer_model(fields, settings, dtype):
    """lorakit's trainer step: frozen weights in ``dtype``, fp32 adapters, bf16 autocast when
    ``dtype`` is bf16, the trainer's attention and norms, and its loss (the head on label
    positions only)."""
    model = lorakit.get_peft_model(build(fields).to(dtype), lorakit.LoraConfig(**settings)).train()
    speed_up(model)  # the trainer's attention and norms

    def loss(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            total, count = loss_sum(model, batch)
        return total / count
    return model, loss


def batch_of(fields, batch_size, seq_len, label_fraction=1.0):
    ids = torch.randint(0, fields["vocab_size"], (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :seq_len - round(label_fraction * seq_len)] = -100  # a prompt without labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def saved_bytes_per_token(fields, settings, dtype, seq_len, checkpointing=False, make=peft_model,
                          per_token_only=False):
    """Bytes autograd saves in a forward pass, per token; ``per_token_only`` leaves out tensors
    without a sequence dimension (the bf16 copies of the adapter weights autocast makes, which
    the estimate counts in its adapter part)."""
    model, loss = make(fields, settings, dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(batch_of(fields, 1, seq_len))
    kept = [t for t in seen.values()  # leave out the loss: labels, log-softmax, scalars
            if t.shape[-1:] != (fields["vocab_size"],) and t.dtype != torch.int64 and t.dim()
            and (any(d % seq_len == 0 for d in t.shape) or not per_token_only)]
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
                       seq_len=seq_len, autocast=False, fused_kernels=False).memory.activation_bytes_per_token
    assert measured <= planned <= 1.1 * measured


@pytest.mark.parametrize("arch, settings, dtype", [
    ("llama", dict(r=16, target_modules=SEVEN), "bfloat16"),
    ("llama", dict(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05), "bfloat16"),
    ("llama", dict(r=16, target_modules=SEVEN), "float32"),
    ("qwen3", dict(r=8, target_modules=SEVEN), "bfloat16"),
    ("phi3", dict(r=8, target_modules=PHI3), "bfloat16"),
])
def test_activations_are_what_the_trainer_step_saves(arch, settings, dtype, tmp_path):
    """Under autocast each adapter keeps bf16 copies of its input and x·A, not fp32 ones.
    (48 tokens: no other dimension of these models is 48.)"""
    measured = saved_bytes_per_token(MEASURE[arch], settings, getattr(torch, dtype), 48,
                                     make=trainer_model, per_token_only=True)
    planned = estimate(write_config(tmp_path, MEASURE[arch]), **settings, dtype=dtype,
                       seq_len=48).memory.activation_bytes_per_token
    assert measured <= planned <= 1.1 * measured


def test_checkpointing_saves_only_block_inputs(tmp_path):
    fields, settings = MEASURE["llama"], dict(r=16, target_modules=SEVEN)
    measured = saved_bytes_per_token(fields, settings, torch.bfloat16, 64, checkpointing=True)
    assert measured == 3 * 128 * 2 + 4 * 128 + 4  # each block's bf16 input, the final norm's


def live_peak_of_a_step(model, loss, batch, tmp_path) -> int:
    """Bytes of live tensors at the peak of one training step (PyTorch's memory profiler), with
    AdamW's moments in place as in every step after the first."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    path = tmp_path / "timeline.json"
    prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())
    return max(sum(s) for s in sizes)


PEAK_FIELDS = dict(MEASURE["llama"], hidden_size=256, intermediate_size=640, vocab_size=4000,
                   tie_word_embeddings=True)


def test_estimate_matches_the_live_peak_of_a_training_step(tmp_path):
    """Live tensors at the peak of a PEFT step (bf16 model, labels=), against the estimate
    without the allocator and runtime parts. (Peak RSS of whole runs: test_plan_peak_rss.py.)"""
    settings = dict(r=16, lora_alpha=16, target_modules=SEVEN)
    model, loss = peft_model(PEAK_FIELDS, settings, torch.bfloat16)
    live = live_peak_of_a_step(model, loss, batch_of(PEAK_FIELDS, 4, 128), tmp_path)
    m = estimate(write_config(tmp_path, PEAK_FIELDS), **settings, batch_size=4, seq_len=128,
                 autocast=False, head_on_labels=False).memory
    assert live <= m.total - m.allocator - m.overhead <= 1.1 * live


@pytest.mark.parametrize("label_fraction", [1.0, 0.5])
def test_estimate_matches_the_live_peak_of_a_trainer_step(label_fraction, tmp_path):
    """The same for lorakit's trainer step: autocast, the head on the labelled positions only."""
    settings = dict(r=16, lora_alpha=16, target_modules=SEVEN)
    model, loss = trainer_model(PEAK_FIELDS, settings, torch.bfloat16)
    live = live_peak_of_a_step(model, loss, batch_of(PEAK_FIELDS, 4, 128, label_fraction),
                               tmp_path)
    m = estimate(write_config(tmp_path, PEAK_FIELDS), **settings, batch_size=4, seq_len=128,
                 label_fraction=label_fraction).memory
    assert live <= m.total - m.allocator - m.overhead <= 1.1 * live


def test_memory_scales_with_tokens_and_dtype():
    # transformers' attention and a head on every position: both linear in the tokens (lorakit's
    # attention keeps probabilities, quadratic in the length; its head works in bounded chunks)
    linear = dict(fused_kernels=False, head_on_labels=False)
    small = estimate("Llama-3-8B", r=16, target_modules=SEVEN, batch_size=1, seq_len=512, **linear).memory
    big = estimate("Llama-3-8B", r=16, target_modules=SEVEN, batch_size=4, seq_len=1024, **linear).memory
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
    assert "total = weights + adapter + activations + logits + allocator + overhead" \
        in memory.__doc__
