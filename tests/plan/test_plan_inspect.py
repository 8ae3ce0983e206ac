"""`inspect_adapter` on adapters saved by PEFT's save_pretrained from tiny models."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import AdapterFormatError
from lorakit.plan.inspection import inspect_adapter

from .tiny import SEVEN, TINY, build


def save_adapter(directory, arch="llama", trained=True, seed=1, **settings):
    settings = {"r": 4, "lora_alpha": 8, "target_modules": SEVEN} | settings
    model = peft.get_peft_model(build(TINY[arch]), peft.LoraConfig(**settings))
    if trained:  # stand in for training: give every B (an embedding's A) values
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.data = torch.randn(p.shape, generator=g)
    model.save_pretrained(directory)
    return model


def test_norms_are_the_norms_of_peft_delta_weights(tmp_path):
    model = save_adapter(tmp_path, "qwen2", target_modules=["q_proj", "down_proj", "embed_tokens"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3})
    ins = inspect_adapter(tmp_path)
    assert len(ins.modules) == 1 + 2 * 3
    for m in ins.modules:
        layer = model.base_model.model.get_submodule(m.name)
        assert m.r == layer.r["default"] and m.scale == pytest.approx(layer.scaling["default"])
        assert m.update_norm == pytest.approx(layer.get_delta_weight("default").norm().item(), rel=1e-5)
    down = [m for m in ins.modules if m.name.endswith("down_proj")]
    assert {(m.r, m.lora_alpha) for m in down} == {(2, 3)}
    assert ins.warnings == ()
    assert ins.other_tensors == ("base_model.model.model.embed_tokens.base_layer.weight",)


def test_layer_norms_rank_the_layers_that_changed_most(tmp_path):
    model = save_adapter(tmp_path, "llama_bias")
    with torch.no_grad():  # make layer 2 change most
        for name, p in model.named_parameters():
            if "layers.2." in name and "lora_B" in name:
                p.mul_(10)
    model.save_pretrained(tmp_path)
    norms = inspect_adapter(tmp_path).layer_norms
    assert list(norms) == [0, 1, 2]
    assert max(norms, key=norms.get) == 2


def test_summary_fields(tmp_path):
    model = save_adapter(tmp_path)
    ins = inspect_adapter(tmp_path)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert ins.params == lora_params
    assert ins.file_bytes == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert ins.config["r"] == 4 and ins.dtypes == ("float32",)
    assert json.loads(json.dumps(ins.to_dict()))["layer_norms"].keys() == {"0", "1"}


def test_untrained_adapter_is_reported(tmp_path):
    save_adapter(tmp_path, trained=False)
    ins = inspect_adapter(tmp_path)
    assert all(m.zero_update and m.update_norm == 0 for m in ins.modules)
    assert any(w.startswith("untrained adapter") for w in ins.warnings)


def test_partly_trained_and_non_finite_adapters_are_reported(tmp_path):
    save_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    v1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[q0] = torch.zeros_like(tensors[q0])
    tensors[v1][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    warnings = " | ".join(inspect_adapter(tmp_path).warnings)
    assert "1 of 14 modules have a zero update" in warnings and "layers.0.self_attn.q_proj" in warnings
    assert "non-finite values (NaN or Inf) in 1 tensors" in warnings and "v_proj.lora_A" in warnings


def test_rank_different_from_the_config_is_reported(tmp_path):
    save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert any("config says r=8, the tensors have rank 4" in w for w in inspect_adapter(tmp_path).warnings)


def test_broken_adapters_are_format_errors(tmp_path):
    save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(AdapterFormatError, match="layers.1.mlp.up_proj has no lora_B"):
        inspect_adapter(tmp_path / "a")

    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        inspect_adapter(tmp_path / "a")

    path.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="pickle, which lorakit never loads"):
        inspect_adapter(tmp_path / "a")


def test_directories_that_are_not_adapters(tmp_path):
    with pytest.raises(AdapterFormatError, match="not a directory"):
        inspect_adapter(tmp_path / "missing")
    save_adapter(tmp_path / "run" / "adapter")
    with pytest.raises(AdapterFormatError, match="no adapter_config.json.*sub-folders: adapter"):
        inspect_adapter(tmp_path / "run")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 1}))
    with pytest.raises(AdapterFormatError, match="'IA3'; lorakit inspects LoRA adapters only"):
        inspect_adapter(tmp_path / "x")
