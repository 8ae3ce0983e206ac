"""Planned trainable-parameter counts equal what get_peft_model produces (PEFT's and lorakit's),
on tiny real models of seven architectures and on big shapes built on the meta device."""

import pytest

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.plan import estimate, load_shape
from lorakit.plan.catalog import CATALOG

from .tiny import IMPLEMENTATIONS, SEVEN, TINY, build, count, implementations, write_config

# (tiny architecture, LoraConfig arguments): every targeting feature the planner claims.
TINY_CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=SEVEN)),
    ("llama_bias", dict(r=4, target_modules="all-linear")),
    ("mistral", dict(r=8, target_modules=r".*\.self_attn\.(q|v)_proj")),
    ("qwen2", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32})),
    ("qwen2", dict(r=4)),  # PEFT's default targets for the model type
    ("qwen3", dict(r=4, target_modules=SEVEN, exclude_modules=["k_proj"], use_rslora=True)),
    ("gemma2", dict(r=4, target_modules=["q_proj", "o_proj", "up_proj"], layers_to_transform=[1])),
    ("phi3", dict(r=4, target_modules=["qkv_proj", "gate_up_proj", "down_proj"], use_dora=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
    ("llama", dict(r=4, target_modules=["embed_tokens", "lm_head", "q_proj"])),
]


@implementations
@pytest.mark.parametrize("arch, settings", TINY_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_tiny_models_count_as_get_peft_model_does(impl, arch, settings, tmp_path):
    config_json = write_config(tmp_path / arch, TINY[arch])
    LoraConfig, get_peft_model = IMPLEMENTATIONS[impl]
    config = LoraConfig(**settings)
    base = build(TINY[arch])
    base_total = count(base)[1]
    trainable, total = count(get_peft_model(base, config))

    planned = estimate(config_json, config)
    assert planned.base_params == base_total
    assert planned.trainable_params == trainable
    assert planned.all_params == total


@pytest.mark.parametrize("arch, settings", TINY_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_targeted_modules_ranks_and_scales_match_peft(arch, settings, tmp_path):
    import peft

    model = peft.get_peft_model(build(TINY[arch]), peft.LoraConfig(**settings))
    expected = {name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
                for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    planned = estimate(write_config(tmp_path, TINY[arch]), peft.LoraConfig(**settings))
    assert {t.name: (t.r, pytest.approx(t.scale)) for t in planned.targets} == expected


# Big shapes on the meta device, including the lesson's numbers.
BIG_CASES = [
    ("Llama-3-8B", dict(r=16, lora_alpha=16, target_modules=SEVEN), 41_943_040, 8_030_261_248),
    ("Llama-3-8B", dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3_407_872, 8_030_261_248),
    ("SmolLM2-135M", dict(r=16, lora_alpha=16, target_modules=SEVEN), 4_884_480, 134_515_008),
    ("Mistral-7B-v0.3", dict(r=16, target_modules=SEVEN), None, None),
    ("Qwen2.5-7B", dict(r=32, target_modules="all-linear"), None, 7_615_616_512),
    ("Gemma-2-2B", dict(r=16, target_modules=SEVEN), None, 2_614_341_888),
    ("Phi-3-mini", dict(r=8, target_modules=["qkv_proj", "o_proj"]), None, None),
]


@implementations
@pytest.mark.parametrize("name, settings, trainable, base", BIG_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_big_models_on_the_meta_device(impl, name, settings, trainable, base):
    LoraConfig, get_peft_model = IMPLEMENTATIONS[impl]
    model = build(CATALOG[name], meta=True)
    real_base = count(model)[1]
    real_trainable, real_total = count(get_peft_model(model, LoraConfig(**settings)))

    planned = estimate(name, **settings)
    assert (planned.trainable_params, planned.base_params) == (real_trainable, real_base)
    assert planned.all_params == real_total
    if trainable is not None:  # the published numbers, where the lesson gives them
        assert planned.trainable_params == trainable
    if base is not None:
        assert planned.base_params == base


def test_the_lessons_printed_line():
    planned = estimate("Llama-3-8B", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert planned.peft_line() == ("trainable params: 3,407,872 || all params: 8,033,669,120"
                                   " || trainable%: 0.0424")


def test_default_model_is_read_from_its_gguf_header():
    shape = load_shape()
    assert "gguf" in shape.source and shape.model_type == "llama"
    assert (shape.num_layers, shape.hidden_size, shape.tie_word_embeddings) == (30, 576, True)
    planned = estimate(None, r=16, lora_alpha=16, target_modules=SEVEN)
    assert planned.base_params == 134_515_008
    assert planned.trainable_params == 4_884_480
    assert planned.peft_line() == ("trainable params: 4,884,480 || all params: 139,399,488"
                                   " || trainable%: 3.5039")
    assert load_shape("smollm2-135m") is shape  # read once per process


def test_a_target_that_matches_nothing_is_named():
    with pytest.raises(ConfigError, match=r"\['qproj'\].*q_proj"):
        estimate("SmolLM2-135M", target_modules=["qproj", "v_proj"])


def test_bad_settings_are_reported_together():
    with pytest.raises(ConfigError) as err:
        estimate("SmolLM2-135M", r=0, lora_dropout=1.5)
    assert "r=0" in str(err.value) and "lora_dropout=1.5" in str(err.value)
    with pytest.raises(ConfigError, match="unknown settings.*rank"):
        estimate("SmolLM2-135M", rank=8)
    with pytest.raises(ConfigError, match="modules_to_save"):
        estimate("SmolLM2-135M", config={"r": 8, "modules_to_save": ["lm_head"]})


def test_unknown_model_lists_the_built_in_names():
    with pytest.raises(ModelLoadError, match="Llama-3-8B.*Gemma-2-2B"):
        load_shape("Llama-9-1T")
