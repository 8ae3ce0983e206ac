"""PeftModel behaviour: several adapters, trainability, dropout, merging, saving and loading."""

import pytest
import torch

from lorakit import ConfigError, LoraConfig, PeftModel, get_peft_model
from lorakit.inject import lora_layers

from .tiny import SEVEN, input_ids, tiny_llama


def perturbed(model, seed=5):
    """Give every adapter a non-zero B so that adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model.get_base_model()):
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
    return model


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def test_two_adapters_switch_and_delete():
    model = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])))
    model.add_adapter("other", LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    assert model.active_adapter == "default" and set(model.peft_config) == {"default", "other"}
    first = logits(model)
    model.set_adapter("other")
    second = logits(model)
    assert model.active_adapters == ["other"] and not torch.allclose(first, second)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("adapters.other." in n for n in trainable)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)
    model.delete_adapter("other")
    assert set(model.peft_config) == {"default"}
    assert all("other" not in n for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ConfigError, match="no adapter named"):
        model.set_adapter("missing")


def test_disable_adapter_is_the_base_model_exactly():
    base = tiny_llama()
    expected = logits(base)
    model = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=SEVEN)))
    assert not torch.allclose(logits(model), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    assert not torch.allclose(logits(model), expected)


def test_merge_is_equivalent_and_unmerge_restores():
    model = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=SEVEN, lora_alpha=16)))
    weight = model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.clone()
    before = logits(model)
    model.merge_adapter()
    assert torch.allclose(logits(model), before, atol=1e-5)  # not added twice
    model.unmerge_adapter()
    assert torch.allclose(model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight, weight, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(True for _ in lora_layers(merged))
    assert torch.allclose(logits(merged), before, atol=1e-5)


def test_merge_and_unload_with_safe_merge_refuses_broken_weights():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(Exception, match="non-finite"):
        model.merge_and_unload(safe_merge=True)


def test_dropout_acts_on_the_adapter_path_in_training_only():
    model = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=SEVEN, lora_dropout=0.5)))
    model.train()
    ids = input_ids()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))
    with model.disable_adapter():
        model.train()
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_selected_adapters_are_saved_in_peft_layout(tmp_path):
    model = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])))
    model.add_adapter("second", LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "all" / "second" / "adapter_model.safetensors").is_file()
    model.save_pretrained(tmp_path / "one", selected_adapters=["second"])
    assert not (tmp_path / "one" / "adapter_model.safetensors").exists()
    assert (tmp_path / "one" / "second" / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="do not exist"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["third"])


def test_save_then_load_gives_identical_outputs_frozen_by_default(tmp_path):
    model = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=SEVEN + ["embed_tokens"])))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert not loaded.training and loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_load_adapter_adds_a_second_adapter(tmp_path):
    first = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])), seed=1)
    first.save_pretrained(tmp_path / "a")
    second = perturbed(get_peft_model(tiny_llama(), LoraConfig(target_modules=["v_proj"])), seed=2)
    second.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.equal(logits(model), logits(first))
    model.set_adapter("b")
    assert torch.equal(logits(model), logits(second))


def test_unload_gives_back_the_original_modules():
    base = tiny_llama()
    q_proj = base.model.layers[0].self_attn.q_proj
    model = perturbed(get_peft_model(base, LoraConfig(target_modules=SEVEN)))
    restored = model.unload()
    assert restored is base and restored.model.layers[0].self_attn.q_proj is q_proj
    assert torch.equal(logits(restored), logits(tiny_llama()))


def test_passes_through_to_the_base_model():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert model.config.hidden_size == 32  # attribute look-ups reach the user's model
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    loss = model(input_ids=input_ids(), labels=input_ids()).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_forward_shows_the_user_models_arguments_and_adapter_names():
    import copy
    import inspect
    import pickle

    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    theirs = inspect.signature(base.forward).parameters
    ours = inspect.signature(model.forward).parameters
    # what the Trainer reads: the data columns a forward names (input_ids, labels, ...) and **kwargs
    assert [n for n in ours if n != "adapter_names"] == list(theirs)
    assert ours["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(ours)[-1] == "kwargs" and ours["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    assert list(inspect.signature(copy.deepcopy(model).forward).parameters) == list(ours)
    assert "forward" not in vars(model)  # no state on the instance: pickles and copies as before
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(input_ids=input_ids()).logits, logits(model))

    class Plain(torch.nn.Module):  # a model that takes its input positionally
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return self.proj(x) * scale

    wrapped = get_peft_model(Plain(), LoraConfig(target_modules=["proj"]))
    assert str(inspect.signature(wrapped.forward)).startswith("(x, scale=1.0, *, adapter_names")
    x = torch.randn(2, 4)
    torch.testing.assert_close(wrapped(x, 2.0), wrapped.get_base_model()(x) * 2.0)


def test_modules_to_save_trains_a_copy():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    wrapper = model.get_base_model().lm_head
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    changed = logits(model)
    with model.disable_adapter():
        assert not torch.allclose(logits(model), changed)
