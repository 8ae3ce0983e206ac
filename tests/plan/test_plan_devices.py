"""Memory per device on several processes (DDP, FSDP2), and which strategy the plan advises: the
parts are the formula of lorakit.plan.sharding, computed here by hand from the config's shapes."""

import math

import pytest

import lorakit.plan.sharding as sharding
from lorakit.errors import ConfigError
from lorakit.plan import estimate, make_plan
from lorakit.plan.report import format_plan
from lorakit.train.distributed import STRATEGIES as TRAINER_STRATEGIES  # re-exported from lorakit.checks

from .tiny import SEVEN, TINY, write_config

GiB = 1024 ** 3
LLAMA_3_8B = 8_030_261_248  # parameters
# Tiny Llama (tests/plan/tiny.py): hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads (kv dim
# 16), vocab 100, untied head.
BLOCK = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32  # q, o; k, v; gate, up, down; 2 norms
ROOT = 100 * 32 + 100 * 32 + 32  # embedding, head, final norm
LAYER_LORA = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))  # r = 4 on all seven
ONE_PROCESS_PARTS = ("activations", "logits", "allocator", "overhead")


def tiny(tmp_path, **settings):
    settings = dict(r=4, target_modules=SEVEN, batch_size=2, seq_len=10) | settings
    return estimate(write_config(tmp_path, TINY["llama"]), **settings)


def test_the_tiny_shape_is_what_the_hand_counts_say(tmp_path):
    e = tiny(tmp_path)
    assert (e.shape.block_params, e.base_params) == (BLOCK, 2 * BLOCK + ROOT) == (9280, 24992)
    assert e.trainable_params == 2 * LAYER_LORA == 4096


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_is_the_single_process_estimate(strategy, tmp_path):
    before = tiny(tmp_path).memory
    one = tiny(tmp_path, gpus=1, strategy=strategy).memory
    assert one.parts() == before.parts() and one.total == before.total and one.distributed == 0
    big = estimate("Llama-3-8B", device="cuda", memory_gb=20, gpus=1, strategy=strategy).memory
    default = estimate("Llama-3-8B", device="cuda", memory_gb=20).memory
    assert big.to_dict() | {"strategy": "ddp"} == default.to_dict()


def test_ddp_holds_everything_and_a_second_copy_of_the_gradients(tmp_path):
    one, ddp = tiny(tmp_path).memory, tiny(tmp_path, gpus=2, strategy="ddp").memory
    params, trainable = 2 * BLOCK + ROOT, 2 * LAYER_LORA
    assert ddp.weights == params * 2  # the whole bf16 model on each device
    assert ddp.adapter == trainable * (16 + 2)  # fp32 weights, gradients, two moments; autocast's bf16 copies
    assert ddp.distributed == trainable * 4  # the gradient buckets
    for part in ONE_PROCESS_PARTS:  # the batch is per process: activations as for one
        assert getattr(ddp, part) == getattr(one, part)
    assert ddp.total == sum(ddp.parts().values()) == one.total + trainable * 4


def test_fsdp_shards_the_model_and_gathers_two_layers_and_the_root(tmp_path):
    one, fsdp = tiny(tmp_path).memory, tiny(tmp_path, gpus=4, strategy="fsdp").memory
    params, trainable = 2 * BLOCK + ROOT, 2 * LAYER_LORA
    assert fsdp.weights == params * 2 // 4  # the frozen bytes / N
    assert fsdp.adapter == trainable * 16 // 4 + trainable * 2  # fp32 state sharded; bf16 copies whole
    layer = BLOCK * 2 + LAYER_LORA * 4  # a decoder layer's bf16 weights and fp32 adapter, unsharded
    root = ROOT * 2  # embedding, head and final norm, gathered through forward and backward
    assert fsdp.distributed == 2 * layer + root == 66_368
    for part in ONE_PROCESS_PARTS:
        assert getattr(fsdp, part) == getattr(one, part)
    assert fsdp.total == sum(fsdp.parts().values())
    assert tiny(tmp_path, gpus=3, strategy="fsdp").memory.weights == math.ceil(params * 2 / 3)


def test_fsdp_gathers_the_largest_layer_and_a_tied_table_once(tmp_path):
    # llama_bias: 3 layers of 9,024 parameters (biases), tied embeddings: the root is the table
    # (100 x 32) and the final norm; adapters on layer 2 only (1,984 parameters at r = 4)
    m = estimate(write_config(tmp_path, TINY["llama_bias"]), r=4, target_modules=SEVEN,
                 layers_to_transform=[2], gpus=2, strategy="fsdp").memory
    assert m.distributed == 2 * (9024 * 2 + 1984 * 4) + (3200 + 32) * 2
    assert m.weights == (3 * 9024 + 3232) * 2 // 2


def test_llama_3_8b_frozen_weights_divide_by_the_gpus():
    for n in (2, 8):
        m = estimate("Llama-3-8B", r=16, target_modules=SEVEN, device="cuda", gpus=n, strategy="fsdp").memory
        assert m.weights == LLAMA_3_8B * 2 // n
    ddp = estimate("Llama-3-8B", r=16, target_modules=SEVEN, device="cuda", gpus=8, strategy="ddp").memory
    assert ddp.weights == LLAMA_3_8B * 2


def test_cpu_processes_share_the_machine_s_memory():
    one = estimate("SmolLM2-135M").memory
    roomy = one.total * 1.5 / GiB  # enough for one process, not for two
    cpu = estimate("SmolLM2-135M", gpus=2, memory_gb=roomy).memory
    assert cpu.machine_total == 2 * cpu.total and cpu.fits is False
    cuda = estimate("SmolLM2-135M", gpus=2, memory_gb=roomy, device="cuda").memory
    assert cuda.machine_total == cuda.total and cuda.fits is True


@pytest.mark.parametrize("memory_gb, suggested, words", [
    (None, "ddp", "give --memory-gb"),
    (40, "ddp", "everything fits one device's 40 GiB"),
    (14, "fsdp", "the frozen weights alone (14.96 GiB) do not fit one device's 14 GiB"),
    (11, None, "FSDP fits from 4 GPUs"),
])
def test_the_plan_says_which_strategy_fits(memory_gb, suggested, words):
    plan = make_plan("Llama-3-8B", "format", 300, memory_gb=memory_gb, device="cuda", gpus=2,
                     strategy="fsdp")
    advice = plan.strategy
    assert advice.suggested == suggested and words in advice.reason
    assert advice.per_device["fsdp"] == plan.recommendation.estimate.memory  # the planned one
    assert advice.per_device["fsdp"].weights == LLAMA_3_8B * 2 // 2
    assert advice.per_device["ddp"].weights == LLAMA_3_8B * 2
    assert advice.exchanged["ddp"] == plan.recommendation.estimate.trainable_params * 4
    assert advice.exchanged["fsdp"] == 2 * 32 * 218_112_000 * 2 + (2 * 525_336_576 + 4096) * 2
    if suggested is None:
        settings = plan.recommendation.lora_config() | dict(
            batch_size=plan.recommendation.batch_size, device="cuda", memory_gb=11, strategy="fsdp",
            gradient_checkpointing=plan.recommendation.gradient_checkpointing)
        assert estimate("Llama-3-8B", **settings, gpus=4).memory.fits
        assert not estimate("Llama-3-8B", **settings, gpus=2).memory.fits


def test_the_text_has_per_device_lines_and_the_train_command_the_processes():
    plan = make_plan("Llama-3-8B", "format", 300, memory_gb=14, device="cuda", gpus=2, strategy="ddp")
    text = format_plan(plan)
    for line in ("2 processes (one per GPU), --strategy ddp; memory below per device",
                 "per device: frozen weights", "DDP grad buckets", "Strategy  2 processes",
                 "use fsdp: the frozen weights alone", "plan again with --strategy fsdp"):
        assert line in text
    assert plan.recommendation.train_args()[-4:] == ["--nproc", "2", "--strategy", "ddp"]
    one = make_plan("Llama-3-8B", "format", 300, memory_gb=14, device="cuda")
    assert format_plan(make_plan("Llama-3-8B", "format", 300, memory_gb=14, device="cuda", gpus=1,
                                 strategy="fsdp")) == format_plan(one)
    assert "--nproc" not in one.recommendation.train_args() and "Strategy" not in format_plan(one)


def test_bad_gpus_and_strategy_are_reported_together():
    with pytest.raises(ConfigError) as err:
        estimate("SmolLM2-135M", gpus=0, strategy="zero3")
    assert "gpus=0: must be a positive number of processes" in str(err.value)
    assert "strategy='zero3': use ddp or fsdp" in str(err.value)


def test_the_strategies_are_the_trainer_s_and_the_formula_is_in_the_docstring():
    assert sharding.STRATEGIES is TRAINER_STRATEGIES == ("ddp", "fsdp")  # one tuple, from lorakit.checks
    assert "distributed = 2 * layer + root" in sharding.__doc__
