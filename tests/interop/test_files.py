"""The adapter directory lorakit writes is the one PEFT writes: same tensor keys and shapes, same
safetensors metadata, an adapter_config.json each library reads from the other."""

import peft
import pytest

import lorakit

from .conftest import (
    ARCHS, HARMLESS_WARNINGS, cases, config_kwargs, lorakit_model, peft_model, saved_config,
    saved_tensors,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]

# Config fields whose saved value may differ between the libraries without changing meaning:
# PEFT writes its own version; target_modules is a set (PEFT lists it unsorted); PEFT adds its
# classifier-head names ("classifier", "score") to modules_to_save for SEQ_CLS.
LOOSE_FIELDS = {"peft_version", "target_modules", "modules_to_save"}


@pytest.mark.parametrize("arch_name, variant", cases("same_files"))
def test_same_tensor_keys_shapes_and_metadata(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    lorakit_model(arch, variant).save_pretrained(tmp_path / "lorakit")
    peft_model(arch, variant).save_pretrained(tmp_path / "peft")

    lk_keys, lk_meta = saved_tensors(tmp_path / "lorakit")
    pf_keys, pf_meta = saved_tensors(tmp_path / "peft")
    assert lk_meta == {"format": "pt"}
    assert pf_meta == {"format": "pt"}
    assert sorted(set(lk_keys) - set(pf_keys)) == [], "keys only lorakit writes"
    # PEFT also writes the trained copy's biases of a modules_to_save wrapper under
    # "<module>.modules_to_save.bias" with bias="all", a key PEFT itself reports as unexpected on
    # load; lorakit writes them once, as "<module>.bias", and accepts PEFT's extra key on load.
    peft_only = sorted(set(pf_keys) - set(lk_keys))
    assert all(k.endswith(".modules_to_save.bias") for k in peft_only), "keys only PEFT writes"
    assert bool(peft_only) == (arch_name == "bert" and variant == "bias_all")
    assert {k: v for k, v in pf_keys.items() if k not in peft_only} == lk_keys
    if variant == "patterns":
        for key, shape in arch.pattern_shapes.items():
            assert lk_keys[key] == shape, key


@pytest.mark.parametrize("arch_name, variant", cases("config"))
def test_adapter_config_json_matches_peft(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    lorakit_model(arch, variant).save_pretrained(tmp_path / "lorakit")
    peft_model(arch, variant).save_pretrained(tmp_path / "peft")
    lk, pf = saved_config(tmp_path / "lorakit"), saved_config(tmp_path / "peft")

    assert sorted(lk) == sorted(pf), "adapter_config.json field names"
    differing = {k: (lk[k], pf[k]) for k in lk if k not in LOOSE_FIELDS and lk[k] != pf[k]}
    assert differing == {}
    assert lk["target_modules"] == sorted(arch.lora["target_modules"]), "saved sorted"
    assert set(pf["target_modules"]) == set(lk["target_modules"])
    assert set(lk["modules_to_save"] or []) <= set(pf["modules_to_save"] or [])
    assert lk["inference_mode"] is True and lk["peft_type"] == "LORA"


@pytest.mark.parametrize("arch_name, variant", cases("config_cross_load"))
def test_adapter_config_loads_in_the_other_library(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    wanted = config_kwargs(arch, variant)
    lorakit_model(arch, variant).save_pretrained(tmp_path / "lorakit")
    peft_model(arch, variant).save_pretrained(tmp_path / "peft")

    in_peft = peft.LoraConfig.from_pretrained(str(tmp_path / "lorakit"))
    in_lorakit = lorakit.LoraConfig.from_pretrained(tmp_path / "peft")
    for config in (in_peft, in_lorakit):
        for key, value in wanted.items():
            got = getattr(config, key)
            if key == "target_modules":
                assert set(got) == set(value), (type(config).__module__, got)
            elif key == "modules_to_save":  # PEFT adds its classifier-head names for SEQ_CLS
                assert set(value) <= set(got) <= set(value) | {"classifier", "score"}, got
            else:
                assert got == value, (type(config).__module__, key, got, value)
        assert config.inference_mode is True
