"""LoraConfig: PEFT's fields and defaults, one validation pass, the JSON file, presets."""

import dataclasses
import json

import peft
import pytest

from lorakit import ConfigError, LoraConfig, preset
from lorakit.config import PRESETS, SEVEN_PROJECTIONS


def test_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        if f.name in ("peft_type", "peft_version"):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert (ours.r, ours.lora_alpha, ours.lora_dropout, ours.bias, ours.init_lora_weights) == (8, 8, 0.0, "none", True)


def test_every_peft_field_exists_in_lorakit():
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)} - {"runtime_config"}
    assert theirs <= ours, sorted(theirs - ours)


def test_list_targets_become_a_set_and_save_sorted(tmp_path):
    config = LoraConfig(target_modules=["v_proj", "q_proj", "v_proj"])
    assert config.target_modules == {"q_proj", "v_proj"}
    config.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert list(data) == sorted(data)  # sorted keys
    assert text.startswith('{\n  "')  # indent 2


def test_file_round_trip_and_peft_reads_it(tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True,
                        rank_pattern={"q_proj": 2}, alpha_pattern={"layers.0.q_proj": 3}, task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path)
    again = LoraConfig.from_pretrained(tmp_path)
    assert again == config
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (theirs.r, theirs.lora_alpha, theirs.use_rslora, theirs.rank_pattern) == (4, 16, True, {"q_proj": 2})


def test_unknown_keys_from_a_newer_version_are_dropped_with_a_warning():
    data = LoraConfig(r=4).to_dict() | {"some_future_option": 1}
    with pytest.warns(UserWarning, match="some_future_option"):
        config = LoraConfig.from_dict(data)
    assert config.r == 4


@pytest.mark.parametrize("field, value, words", [
    ("r", 0, "r=0"),
    ("r", 2.5, "r=2.5"),
    ("lora_alpha", "big", "lora_alpha"),
    ("lora_alpha", float("nan"), "lora_alpha"),
    ("lora_dropout", 1.5, "lora_dropout"),
    ("bias", "some", "bias='some'"),
    ("task_type", "CHAT", "task_type"),
    ("target_modules", [], "target_modules"),
    ("target_modules", "q_proj(", "regular expression"),
    ("exclude_modules", [""], "exclude_modules"),
    ("modules_to_save", "classifier", "modules_to_save"),
    ("layers_to_transform", [-1], "layers_to_transform"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern"),
    ("init_lora_weights", "unknown-init", "init_lora_weights"),
    ("use_dora", "yes", "use_dora='yes'"),
    ("lora_bias", True, "lora_bias"),
    ("peft_type", "IA3", "peft_type"),
])
def test_each_invalid_field_is_a_config_error_naming_it(field, value, words):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{field: value})
    assert words in str(err.value)


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        LoraConfig(r=-1, lora_dropout=2.0, bias="yes")
    message = str(err.value)
    assert "r=-1" in message and "lora_dropout=2.0" in message and "bias='yes'" in message


def test_presets_match_the_lesson():
    assert PRESETS["conservative"] == dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    balanced = preset("balanced")
    assert (balanced.r, balanced.lora_alpha, balanced.lora_dropout) == (16, 16, 0.0)
    assert balanced.target_modules == set(SEVEN_PROJECTIONS)
    assert preset("max_capacity", lora_dropout=0.1).r == 64
    with pytest.raises(ConfigError, match="conservative"):
        preset("huge")
