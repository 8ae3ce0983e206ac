"""`lorakit plan --quantize`: the frozen weights of a 4- or 8-bit base are the bytes bitsandbytes
holds, to the byte; with the dequantization buffer and the 8-bit layers' kept inputs, the estimate
matches the live peak of a trainer step (PyTorch's memory profiler, as test_plan_memory.py) and the
peak RSS of real training runs of the default model (as test_plan_peak_rss.py)."""

import json
import os
import shutil

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.evaluation import loss_sum
from lorakit.models import load_model
from lorakit.plan import advise_strategy, estimate, load_shape
from lorakit.plan.quantization import quantized_weights
from lorakit.train.fast import speed_up

from .test_plan_commands import run
from .test_plan_memory import PEAK_FIELDS, batch_of, live_peak_of_a_step
from .test_plan_peak_rss import measured_run
from .tiny import SEVEN, TINY, build, write_config

MiB = 2 ** 20
# Shapes that exercise the rounding: blocks of 64 weights that do not fill the fp32 scales'
# groups of 256 (k_proj: 288 blocks; gate_proj: 1,560), a head_dim that is not a power of two.
ODD = dict(model_type="llama", hidden_size=192, intermediate_size=520, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
           bos_token_id=1, eos_token_id=2, pad_token_id=2)
# Wide MLP, short batch: the dequantization buffer of a 4,096 x 512 layer is a fifth of the peak.
WIDE = dict(PEAK_FIELDS, hidden_size=512, intermediate_size=4096, num_hidden_layers=2)


def save_model(directory, fields, tokenizer_dir):
    """A random model of ``fields`` saved with the default model's tokenizer files, as
    load_model reads a model directory (tests/conftest.py's tiny_model_dir does the same)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(tokenizer_dir / name, directory / name)
    build(fields).save_pretrained(directory)
    return directory


def held_bytes(model) -> dict[str, int]:
    """What a quantized model holds, by part, each storage once: the quantized weights (packed
    4-bit codes or int8), their quantization constants (every tensor of each 4-bit layer's
    QuantState, the nested state's too; an 8-bit layer's row scales SCB), and every other
    parameter."""
    seen, held = set(), {"codes": 0, "constants": 0, "unquantized": 0}

    def add(part, t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            held[part] += t.numel() * t.element_size()

    def state_tensors(state):
        for value in vars(state).values():  # absmax, code, offset; state2: absmax, code
            if isinstance(value, torch.Tensor):
                yield value
            elif type(value).__name__ == "QuantState":
                yield from state_tensors(value)

    for module in model.modules():
        weight = getattr(module, "weight", None)
        kind = type(weight).__name__
        if kind == "Params4bit":
            add("codes", weight)
            for t in state_tensors(weight.quant_state):
                add("constants", t)
        elif kind == "Int8Params":
            add("codes", weight)
            add("constants", weight.SCB if weight.SCB is not None else module.state.SCB)
    for p in model.parameters():
        add("unquantized", p)
    return held


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_frozen_weights_are_the_bytes_bitsandbytes_holds(quantize, default_model_dir, tmp_path):
    """To the byte: codes, constants (4-bit: the 8-bit absmax per 64 weights, an fp32 scale per
    256 of them, and each layer's own code tables and offset), and the rest in bf16."""
    model_dir = save_model(tmp_path / "model", ODD, default_model_dir)
    model, _ = load_model(model_dir, dtype=torch.bfloat16, quantize=quantize)
    held = held_bytes(model)
    m = estimate(model_dir, dtype="bfloat16", quantize=quantize).memory
    q = m.quantized
    assert (q.codes, q.constants, q.unquantized) == (held["codes"], held["constants"], held["unquantized"])
    assert m.weights == q.total == sum(held.values())
    assert q.layers == 2 * 7
    weights = sum(module.in_features * module.out_features for name, module in model.named_modules()
                  if name.endswith("proj"))
    assert q.codes == (weights // 2 if quantize == "nf4" else weights)  # half a byte or a byte a weight


def test_parts_follow_the_documented_formula(tmp_path):
    # Tiny Llama: hidden 32, MLP 64, 2 layers, q 32x32, k and v 16x32, o 32x32, gate, up 64x32,
    # down 32x64: 9,216 weights a block, in 7 layers.
    config = write_config(tmp_path, TINY["llama"])
    plain = estimate(config, r=4, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=10)
    nf4 = estimate(config, r=4, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=10,
                   quantize="nf4").memory
    q = nf4.quantized
    assert q.codes == 2 * 9216 // 2
    blocks = {1024: 16, 512: 8, 2048: 32}  # absmax values per layer size; each fits one fp32 scale
    sizes = [1024, 512, 512, 1024, 2048, 2048, 2048]
    assert q.constants == 2 * sum(blocks[n] + 4 + 4 * 256 + 4 * 16 + 4 for n in sizes)
    assert q.unquantized == (plain.base_params - 2 * 9216) * 2
    assert nf4.dequantization == 2 * 2048 + 4 * 32  # the largest layer in bf16, its absmax in fp32
    assert nf4.total == sum(nf4.parts().values())
    assert nf4.activations == plain.memory.activations  # a 4-bit layer keeps no input
    assert nf4.allocator > plain.memory.allocator  # a quantized base's slack (lorakit.plan.memory)

    int8 = estimate(config, r=4, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=10,
                    quantize="int8").memory
    assert (int8.quantized.codes, int8.quantized.constants) == (2 * 9216, 2 * 4 * 256)
    # CPU, bf16: the int8 codes in bf16, and the fp32 copies the in-place scaling makes
    assert int8.dequantization == (2 + 8) * 2048 + 4 * 64
    # the 8-bit layers keep their inputs where no adapter keeps them: o_proj's, gate/up's, down's
    assert int8.activation_bytes_per_token - nf4.activation_bytes_per_token == 2 * 2 * (32 + 32 + 64)
    cuda = estimate(config, quantize="int8", device="cuda").memory
    assert cuda.dequantization == 2 * 2048 + 4 * 64
    every = dict(r=4, target_modules=SEVEN, batch_size=2, seq_len=10)
    assert (estimate(config, **every, quantize="int8").memory.activations
            == estimate(config, **every, quantize="nf4").memory.activations)  # adapters keep them all


def test_a_quantized_base_has_no_fsdp_and_bad_values_are_reported(tmp_path):
    config = write_config(tmp_path, TINY["llama"])
    with pytest.raises(ConfigError) as err:
        estimate(config, quantize="int4", gpus=2, strategy="fsdp")
    assert "quantize='int4': use one of nf4, fp4, int8" in str(err.value)
    with pytest.raises(ConfigError) as err:
        estimate(config, quantize="nf4", gpus=2, strategy="fsdp")
    assert "FSDP2 does not shard bitsandbytes' quantized weights" in str(err.value)
    shape = load_shape(config)
    advice = advise_strategy(shape, dict(r=4), gpus=2, quantize="nf4", memory_gb=4)
    assert advice.suggested == "ddp" and list(advice.per_device) == ["ddp"]
    assert "--quantize nf4" in advice.reason and "; it fits" in advice.reason
    short = advise_strategy(shape, dict(r=4), gpus=2, quantize="nf4", memory_gb=1)  # 2 x 0.5 GiB runtime
    assert short.suggested == "ddp" and "it does not fit 1 GiB" in short.reason
    one = advise_strategy(load_shape(config), dict(r=4), gpus=1, quantize="nf4")
    assert one.per_device["ddp"].quantize == "nf4"


def quantized_trainer_model(model_dir, settings, quantize):
    """lorakit's trainer step on a quantized base: load_model(quantize=) in bf16, fp32 adapters
    under bf16 autocast, the trainer's attention and norms and its loss (as test_plan_memory.py's
    trainer_model)."""
    base, _ = load_model(model_dir, dtype=torch.bfloat16, quantize=quantize)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(**settings)).train()
    speed_up(model)

    def loss(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, count = loss_sum(model, batch)
        return total / count
    return model, loss


@pytest.mark.parametrize("quantize, fields, targets, batch_size, seq_len", [
    ("nf4", PEAK_FIELDS, SEVEN, 4, 128),
    ("int8", PEAK_FIELDS, SEVEN, 4, 128),
    ("int8", PEAK_FIELDS, ["q_proj", "v_proj"], 4, 128),  # the 8-bit layers keep their inputs
    ("nf4", WIDE, ["q_proj", "v_proj"], 1, 64),  # the dequantization buffer is a fifth of it
    ("int8", WIDE, ["q_proj", "v_proj"], 1, 64),
])
def test_estimate_matches_the_live_peak_of_a_trainer_step(quantize, fields, targets, batch_size, seq_len,
                                                         default_model_dir, tmp_path):
    """Live tensors at the peak of lorakit's trainer step on a quantized base, against the estimate
    without the allocator and runtime parts (as test_plan_memory.py's trainer-step test)."""
    settings = dict(r=16, lora_alpha=16, target_modules=targets)
    model_dir = save_model(tmp_path / "model", fields, default_model_dir)
    model, loss = quantized_trainer_model(model_dir, settings, quantize)
    live = live_peak_of_a_step(model, loss, batch_of(fields, batch_size, seq_len), tmp_path)
    m = estimate(model_dir, **settings, batch_size=batch_size, seq_len=seq_len, quantize=quantize).memory
    assert live <= m.total - m.allocator - m.overhead <= 1.1 * live


# (quantize, preset, batch size, max_length, records): 3 steps each, as test_plan_peak_rss.py
RUNS = [
    ("nf4", "conservative", 4, 256, "text"),
    ("nf4", "balanced", 8, 128, "completion"),
    ("int8", "conservative", 4, 256, "text"),
]


@pytest.mark.slow
@pytest.mark.parametrize("quantize, name, batch_size, max_length, kind", RUNS)
def test_estimate_is_within_25_percent_of_peak_rss(quantize, name, batch_size, max_length, kind,
                                                   default_model_dir, tmp_path, capsys):
    """`lorakit.train.train` with --quantize in its own process (tests/plan/train_peak.py): its
    peak RSS against the estimate of what it did."""
    measured, e = measured_run(default_model_dir, tmp_path, name, batch_size, max_length, kind, quantize)
    peak = measured["peak_rss"]
    report = (f"{quantize} {name} {measured['batch_size']}x{measured['seq_len']}: estimate "
              f"{e.total / MiB:,.0f} MiB, peak RSS {peak / MiB:,.0f} MiB ({e.total / peak - 1:+.1%})")
    with capsys.disabled():
        print("\n" + report)
    assert abs(e.total - peak) <= 0.25 * peak, report


def test_plan_prints_the_quantized_weights(capsys):
    assert run(["plan", "--task", "domain", "--examples", "1000", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "Training  cpu, bfloat16, base quantized to nf4" in out
    assert "memory: frozen weights (nf4, 4-bit + double-quantized constants)" in out
    for line in ("nf4 codes, 4 bits a weight", "quantization constants",
                 "embedding, norms, head (bfloat16)", "dequantization buffer (bfloat16)"):
        assert line in out
    assert out.rstrip().endswith("--quantize nf4")  # the train command trains on the same base
    assert run(["plan", "--task", "domain", "--examples", "1000", "--quantize", "int8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    memory = doc["recommendation"]["estimate"]["memory"]
    shape = load_shape(None)
    assert doc["quantize"] == memory["quantize"] == "int8"
    assert memory["quantized"]["codes"] == quantized_weights(shape, "int8", 2).codes
    assert memory["weights"] == sum(memory["quantized"][k] for k in ("codes", "constants", "unquantized"))


def test_a_bad_quantize_value_is_argparse_s_choices_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["plan", "--task", "domain", "--examples", "10", "--quantize", "q4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'q4' (choose from 'nf4', 'fp4', 'int8')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["plan", "--help"])
    assert "--quantize {nf4,fp4,int8}" in capsys.readouterr().out
