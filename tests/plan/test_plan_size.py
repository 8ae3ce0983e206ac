"""The planned adapter size equals the size of the file save_pretrained writes (exactly; the
requirement is within 1%), and the planned tensor list equals the file's."""

import os

import peft
import pytest
import torch
from safetensors import safe_open

from lorakit.plan import estimate
from lorakit.plan.costs import adapter_tensors, safetensors_size

from .tiny import IMPLEMENTATIONS, SEVEN, TINY, build, implementations, write_config

CASES = [
    ("llama", dict(r=16, lora_alpha=16, target_modules=SEVEN)),
    ("qwen2", dict(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})),
    ("gpt2", dict(r=4, target_modules=["c_attn", "mlp.c_fc"], fan_in_fan_out=True)),
    ("phi3", dict(r=4, target_modules=["qkv_proj", "down_proj"], use_dora=True)),
    ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),  # PEFT also saves the table
    ("llama", dict(r=4, target_modules=["lm_head"])),
    ("gemma2", dict(r=8, target_modules="all-linear")),
]


def _file_tensors(path):
    with safe_open(path, "pt") as f:
        return sorted((key, tuple(f.get_slice(key).get_shape())) for key in f.keys())


@implementations
@pytest.mark.parametrize("arch, settings", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_planned_size_is_the_saved_file_size(impl, arch, settings, tmp_path):
    LoraConfig, get_peft_model = IMPLEMENTATIONS[impl]
    model = get_peft_model(build(TINY[arch]), LoraConfig(**settings))
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"

    planned = estimate(write_config(tmp_path / "base", TINY[arch]), LoraConfig(**settings))
    spec = planned.spec
    assert sorted(adapter_tensors(list(planned.targets), spec.use_dora, spec.target_modules)) \
        == _file_tensors(path)
    actual = os.path.getsize(path)
    assert abs(planned.adapter_bytes_fp32 - actual) <= 0.01 * actual
    assert planned.adapter_bytes_fp32 == actual


def test_bf16_size_is_the_saved_bf16_file_size(tmp_path):
    settings = dict(r=8, lora_alpha=8, target_modules=SEVEN)
    base = build(TINY["llama"]).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(**settings), autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    planned = estimate(write_config(tmp_path / "base", TINY["llama"]), **settings)
    assert planned.adapter_bytes_bf16 == os.path.getsize(path)


def test_header_size_grows_with_offset_digits():
    # Offsets are written as decimal numbers, so a file's header depends on the byte positions:
    # a big tensor before a small one changes the digit count of the later offsets.
    small = safetensors_size([("a", (2, 2))])
    big = safetensors_size([("a", (2, 2)), ("b", (1000, 1000))])
    assert big - small > 4 * 1000 * 1000
    assert (small - 8) % 8 == 0 and (big - 8) % 8 == 0


def test_the_lessons_adapter_is_about_thirty_megabytes():
    # "A 7B model's LoRA adapter is just 30MB": r=16 on q_proj and v_proj of Llama-2-7B.
    planned = estimate("Llama-2-7B", r=16, target_modules=["q_proj", "v_proj"])
    assert 30e6 < planned.adapter_bytes_fp32 < 36e6
    assert planned.adapter_bytes_bf16 < 0.51 * planned.adapter_bytes_fp32
