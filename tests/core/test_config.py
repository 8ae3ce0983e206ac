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
    # wrong types that used to escape as TypeError / AttributeError, and absurd numbers
    ("target_modules", 5, "target_modules=5: must be a non-empty list of module names"),
    ("target_modules", [["q_proj"]], "target_modules=[['q_proj']]"),
    ("target_modules", {"q_proj": 1}, "target_modules={'q_proj': 1}"),
    ("exclude_modules", 7, "exclude_modules=7"),
    ("exclude_modules", [["k_proj"]], "exclude_modules=[['k_proj']]"),
    ("modules_to_save", [["norm"]], "modules_to_save=[['norm']]"),
    ("modules_to_save", ["lm_head("], "modules_to_save=['lm_head(']"),
    ("layers_to_transform", {"0": 1}, "layers_to_transform={'0': 1}"),
    ("layers_to_transform", [[0]], "layers_to_transform=[[0]]"),
    ("peft_type", ["LORA"], "peft_type=['LORA']"),
    ("r", 10**18, "r=1000000000000000000: ranks above 1,048,576"),
    ("r", "8", "r='8'"),
    ("lora_alpha", 1e308, "lora_alpha=1e+308: |alpha| above"),
    ("lora_alpha", float("inf"), "lora_alpha=inf"),
    ("alpha_pattern", {"q_proj": 1e308}, "alpha_pattern['q_proj']=1e+308"),
    ("rank_pattern", {"q_proj": 2**40}, "rank_pattern['q_proj']=1099511627776"),
    ("rank_pattern", {5: 2}, "rank_pattern[5]"),
    ("inference_mode", "false", "inference_mode='false': must be true or false"),
    ("use_rslora", 1, "use_rslora=1"),
    ("fan_in_fan_out", None, "fan_in_fan_out=None"),
    ("base_model_name_or_path", 3, "base_model_name_or_path=3"),
    ("auto_mapping", [], "auto_mapping=[]"),
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


def test_a_deeply_nested_value_is_a_config_error_with_a_short_message():
    deep = inner = []
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(ConfigError) as err:
        LoraConfig(target_modules=deep, modules_to_save=deep, rank_pattern={"q_proj": deep})
    assert "target_modules=[[[[...]]]]" in str(err.value) and len(str(err.value)) < 1000


def test_layers_pattern_is_type_checked_and_refused_with_a_regex_target_as_in_peft():
    with pytest.raises(ConfigError, match="layers_pattern=5"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=5)
    with pytest.raises(ValueError, match="layers_pattern"):
        peft.LoraConfig(target_modules=".*q_proj", layers_pattern="layers")
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig(target_modules=".*q_proj", layers_pattern="layers")
