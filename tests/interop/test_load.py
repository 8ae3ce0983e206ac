"""An adapter saved by lorakit loads in PEFT, and one saved by PEFT loads in lorakit: cleanly
(no missing or unexpected keys) and with the same logits (max abs diff <= 1e-6, fp32)."""

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit

from .conftest import (
    ARCHS, HARMLESS_WARNINGS, adapter_files, cases, config_kwargs, load_in_peft, logits,
    lorakit_model, max_diff, peft_model, perturb_extra_trainables,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]

TOL = 1e-6


def assert_adapter_matters(arch, out):
    """The adapter must change the outputs, or equal outputs would prove nothing."""
    assert max_diff(out, logits(arch.build(), arch)) > 1e-3


def assert_same_tensors(original_dir, resaved_dir):
    """Every tensor of the original file comes back bitwise from the other library's save."""
    original = load_file(str(original_dir / "adapter_model.safetensors"))
    resaved = load_file(str(resaved_dir / "adapter_model.safetensors"))
    # PEFT's duplicate "<module>.modules_to_save.bias" (bias="all") is the same tensor as the
    # "<module>.bias" that lorakit writes once.
    original = {k.replace(".modules_to_save.bias", ".bias"): t for k, t in original.items()}
    assert sorted(set(original) - set(resaved)) == []
    for key, tensor in original.items():
        assert torch.equal(resaved[key], tensor), key


@pytest.mark.parametrize("arch_name, variant", cases("lorakit_to_peft"))
def test_lorakit_adapter_loads_in_peft(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, variant)
    lk.save_pretrained(tmp_path / "adapter")
    expected = logits(lk, arch)
    assert_adapter_matters(arch, expected)

    pm, result = load_in_peft(arch, tmp_path / "adapter")
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert max_diff(logits(pm, arch), expected) <= TOL

    # The user's path, PeftModel.from_pretrained, warns about missing adapter keys: none here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm2 = peft.PeftModel.from_pretrained(arch.build(), str(tmp_path / "adapter"))
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert max_diff(logits(pm2, arch), expected) <= TOL

    pm2.save_pretrained(tmp_path / "resaved")
    assert_same_tensors(tmp_path / "adapter", tmp_path / "resaved")


@pytest.mark.parametrize("arch_name, variant", cases("peft_to_lorakit"))
def test_peft_adapter_loads_in_lorakit(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    pm = peft_model(arch, variant)
    pm.save_pretrained(tmp_path / "adapter")
    expected = logits(pm, arch)
    assert_adapter_matters(arch, expected)

    # lorakit's loading is strict: any missing, unexpected or mis-shaped tensor raises.
    lk = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path / "adapter")
    assert not lk.training
    assert not [n for n, p in lk.named_parameters() if p.requires_grad], "loads frozen"
    assert max_diff(logits(lk, arch), expected) <= TOL

    lk.save_pretrained(tmp_path / "resaved")
    assert_same_tensors(tmp_path / "adapter", tmp_path / "resaved")


# --------------------------------------------------------------------------- named adapters

EXPECTED_FILES = {
    "adapter_config.json", "adapter_model.safetensors",
    "other/adapter_config.json", "other/adapter_model.safetensors",
}


def other_kwargs(arch):
    """A second adapter that differs from the first (rank and scale)."""
    return config_kwargs(arch, "plain", r=2, lora_alpha=5)


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_second_adapter_saved_by_lorakit_loads_in_peft(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, "plain")
    torch.manual_seed(3)
    lk.add_adapter("other", lorakit.LoraConfig(**other_kwargs(arch)))
    perturb_extra_trainables(lk, seed=3)
    lk.save_pretrained(tmp_path)
    assert adapter_files(tmp_path) == EXPECTED_FILES

    pm = peft.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    result = pm.load_adapter(str(tmp_path / "other"), "other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    outputs = {}
    for name in ("default", "other"):
        lk.set_adapter(name)
        pm.set_adapter(name)
        outputs[name] = logits(lk, arch)
        assert max_diff(logits(pm, arch), outputs[name]) <= TOL, name
    assert max_diff(outputs["default"], outputs["other"]) > 1e-3


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_second_adapter_saved_by_peft_loads_in_lorakit(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    pm = peft_model(arch, "plain")
    torch.manual_seed(4)
    pm.add_adapter("other", peft.LoraConfig(**other_kwargs(arch)))
    perturb_extra_trainables(pm, seed=4)
    pm.save_pretrained(str(tmp_path))
    assert adapter_files(tmp_path) == EXPECTED_FILES

    lk = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path)
    lk.load_adapter(tmp_path / "other", "other")
    outputs = {}
    for name in ("default", "other"):
        pm.set_adapter(name)
        lk.set_adapter(name)
        outputs[name] = logits(pm, arch)
        assert max_diff(logits(lk, arch), outputs[name]) <= TOL, name
    assert max_diff(outputs["default"], outputs["other"]) > 1e-3
