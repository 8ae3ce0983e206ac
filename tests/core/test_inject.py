"""Target matching, wrapping, trainable marking: the same modules as PEFT, errors where PEFT is silent."""

import warnings

import peft
import pytest
import torch.nn as nn

from lorakit import ConfigError, LoraConfig, get_peft_model
from lorakit.inject import lora_layers, pattern_value

from .tiny import SEVEN, tiny_llama


def wrapped_by_lorakit(config: LoraConfig) -> dict[str, int]:
    model = get_peft_model(tiny_llama(), config)
    return {name: layer.adapters["default"].r for name, layer in lora_layers(model.get_base_model())}


def wrapped_by_peft(**kwargs) -> dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    return {name: module.r["default"] for name, module in model.get_base_model().named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=SEVEN),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules=SEVEN, exclude_modules=["down_proj"]),
    dict(target_modules=SEVEN, exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["self_attn.q_proj", "mlp.up_proj"]),
    dict(target_modules=None, task_type="CAUSAL_LM"),
    dict(target_modules=SEVEN, r=8, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 3}),
])
def test_same_modules_and_ranks_as_peft(kwargs):
    assert wrapped_by_lorakit(LoraConfig(**kwargs)) == wrapped_by_peft(**kwargs)


def test_all_linear_skips_the_output_head_and_saves_short_names():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = {name for name, _ in lora_layers(model.get_base_model())}
    assert "lm_head" not in names and len(names) == 2 * 7
    assert model.peft_config["default"].target_modules == set(SEVEN)


def test_an_entry_that_matches_nothing_is_named_with_the_existing_layers():
    with pytest.raises(ConfigError) as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "qproj"]))
    message = str(err.value)
    assert "['qproj']" in message
    for existing in ("q_proj", "down_proj", "embed_tokens", "lm_head"):
        assert existing in message


def test_a_regex_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matched no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.attention\..*"))


def test_a_target_that_is_not_a_layer_lorakit_can_adapt():
    with pytest.raises(ConfigError, match="LlamaMLP"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["mlp"]))


def test_modules_to_save_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="modules_to_save"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["heads"]))


def test_rank_pattern_picks_the_most_specific_pattern_whatever_the_order():
    name = "model.layers.1.self_attn.q_proj"
    assert pattern_value({"q_proj": 2, "layers.1.self_attn.q_proj": 5}, name, 8) == 5
    assert pattern_value({"layers.1.self_attn.q_proj": 5, "q_proj": 2}, name, 8) == 5
    assert pattern_value({"q_proj": 2}, "model.layers.1.self_attn.k_proj", 8) == 8
    # a pattern matches a dot-separated tail only, not any substring
    assert pattern_value({"proj": 2}, name, 8) == 8


def test_rank_pattern_meaning_survives_save_and_load(tmp_path):
    patterns = {"q_proj": 2, "model.layers.1.self_attn.q_proj": 5}
    config = LoraConfig(target_modules=["q_proj"], rank_pattern=patterns)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    again = LoraConfig.from_pretrained(tmp_path)
    ranks = wrapped_by_lorakit(again)
    assert ranks == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 5}


@pytest.mark.parametrize("bias, trainable_biases", [("none", 0), ("lora_only", 2), ("all", 8)])
def test_bias_modes_mark_the_biases_peft_marks(bias, trainable_biases):
    # attention_bias gives q/k/v/o biases: 2 layers x 4 projections; only q_proj is targeted.
    from transformers import LlamaForCausalLM
    from .tiny import tiny_llama_config
    base = LlamaForCausalLM(tiny_llama_config(attention_bias=True))
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], bias=bias))
    biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert len(biases) == trainable_biases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(LlamaForCausalLM(tiny_llama_config(attention_bias=True)),
                                     peft.LoraConfig(target_modules=["q_proj"], bias=bias))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_only_adapter_parameters_train():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=SEVEN))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)


def test_conv1d_gets_fan_in_fan_out_with_a_warning():
    from transformers import GPT2Config, GPT2LMHeadModel
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        model = get_peft_model(base, LoraConfig(target_modules=["c_attn"]))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.adapters["default"].lora_A.shape == (8, 16)
    assert layer.adapters["default"].lora_B.shape == (48, 8)


def test_adapter_weights_are_fp32_over_a_bf16_base():
    import torch
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    adapter = model.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(target_modules=["q_proj"]),
                           autocast_adapter_dtype=False)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.bfloat16


def test_embedding_adapter_shapes_and_init():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], r=4))
    adapter = model.get_base_model().model.embed_tokens.adapters["default"]
    assert adapter.lora_A.shape == (4, 100) and adapter.lora_B.shape == (32, 4)
    assert not adapter.lora_A.any()  # A zero, B normal: the update starts at zero
    assert adapter.lora_B.std() > 0.5
    assert isinstance(model.get_base_model().model.embed_tokens.base_layer, nn.Embedding)
