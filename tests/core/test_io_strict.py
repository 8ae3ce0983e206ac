"""Strict loading: every problem with an adapter file is a typed error that names the tensors."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import AdapterFormatError, CompatibilityError, ConfigError, LoraConfig, PeftModel, get_peft_model
from lorakit.layer import Adapter

from .tiny import tiny_llama

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite(directory, change):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_the_saved_directory_is_exactly_peft_layout(adapter_dir):
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    from safetensors import safe_open
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert len(list(f.keys())) == 2 * 2 * 2 and KEY in f.keys()


def test_missing_and_unexpected_tensors_are_listed_together(adapter_dir):
    def change(t):
        del t[KEY]
        del t[KEY.replace("q_proj", "v_proj")]
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    rewrite(adapter_dir, change)
    with pytest.raises(AdapterFormatError) as err:
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    message = str(err.value)
    assert "missing tensors" in message and KEY in message and KEY.replace("q_proj", "v_proj") in message
    assert "unexpected tensors" in message and "k_proj.lora_A.weight" in message


def test_non_finite_values_are_refused(adapter_dir):
    def change(t):
        t[KEY][0, 0] = float("nan")
        t[KEY.replace("lora_A", "lora_B")][0, 0] = float("inf")
    rewrite(adapter_dir, change)
    with pytest.raises(AdapterFormatError, match="NaN or infinite") as err:
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    assert KEY in str(err.value) and KEY.replace("lora_A", "lora_B") in str(err.value)


def test_non_float_tensors_are_refused(adapter_dir):
    rewrite(adapter_dir, lambda t: t.__setitem__(KEY, torch.zeros(4, 32, dtype=torch.int64)))
    with pytest.raises(AdapterFormatError, match="not floating point") as err:
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    assert KEY in str(err.value) and "int64" in str(err.value)


def test_an_adapter_for_another_base_model_is_a_compatibility_error(adapter_dir):
    with pytest.raises(CompatibilityError) as err:
        PeftModel.from_pretrained(tiny_llama(hidden_size=48, num_attention_heads=4), adapter_dir)
    assert KEY in str(err.value) and "(4, 32)" in str(err.value) and "(4, 48)" in str(err.value)


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    directory = tmp_path / "adapter"
    directory.mkdir()
    LoraConfig(target_modules=["q_proj"]).save_pretrained(directory)
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(AdapterFormatError) as err:
        PeftModel.from_pretrained(tiny_llama(), directory)
    assert "adapter_model.bin" in str(err.value) and "save_file" in str(err.value)
    assert not marker.exists()


def test_a_truncated_file_is_an_adapter_format_error(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="safetensors"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such adapter directory"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "empty")


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", "", "a.b"])
def test_an_adapter_name_that_would_leave_the_directory_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="not allowed"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), adapter_name=name)
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="not allowed"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert list(tmp_path.iterdir()) == []


def test_safe_serialization_false_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)


@pytest.mark.parametrize("text, words", [
    ("[]", "holds a JSON list, not an object"),
    ("null", "holds a JSON NoneType, not an object"),
    ("42", "holds a JSON int, not an object"),
    ('{"r": 4,', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b'{"r": "\xff"}', "not UTF-8"),
])
def test_an_adapter_config_that_is_not_a_json_object_names_the_file(adapter_dir, text, words):
    path = adapter_dir / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for load in (lambda: LoraConfig.from_pretrained(adapter_dir),
                 lambda: PeftModel.from_pretrained(tiny_llama(), adapter_dir)):
        with pytest.raises(AdapterFormatError) as err:
            load()
        assert str(path) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("target_modules", 5), ("target_modules", [["q_proj"]]), ("exclude_modules", {"q_proj": 1}),
    ("peft_type", ["LORA"]), ("r", 10**18), ("lora_alpha", 1e308), ("modules_to_save", [["norm"]]),
])
def test_a_bad_field_in_the_file_is_a_config_error_naming_the_file_and_the_field(adapter_dir, field, value):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(ConfigError) as err:
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    assert str(path) in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("config_r", [2, 100_000])
def test_a_config_rank_that_disagrees_with_the_tensors_is_refused_before_anything_is_allocated(adapter_dir, config_r):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": config_r}))
    base = tiny_llama()
    with pytest.raises(AdapterFormatError) as err:
        PeftModel.from_pretrained(base, adapter_dir)
    message = str(err.value)
    assert f"{KEY}: expected ({config_r}, 32), found (4, 32)" in message and "nothing was loaded" in message
    assert KEY.replace("lora_A", "lora_B") + f": expected (32, {config_r}), found (32, 4)" in message
    from lorakit.layer import LoraLayer
    assert not any(isinstance(m, LoraLayer) for m in base.modules())  # never injected


def test_a_file_tensor_whose_rank_disagrees_with_the_config_is_named(adapter_dir):
    rewrite(adapter_dir, lambda t: t.__setitem__(KEY, torch.zeros(3, 32)))
    with pytest.raises(AdapterFormatError, match=rf"{KEY}: expected \(4, 32\), found \(3, 32\) \(rank 4 in the config\)"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["k_proj"]), "other")
    with pytest.raises(AdapterFormatError, match="found \\(3, 32\\)"):
        model.load_adapter(adapter_dir, "loaded")
    assert "loaded" not in model.peft_config


def test_a_config_targeting_modules_the_file_has_no_tensors_for_is_refused_before_anything_is_allocated(
        adapter_dir, monkeypatch):
    """A huge r with the tensors of the targeted modules missing: nothing to compare shapes with,
    so the targets themselves are checked against the file before any layer is built."""
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 2**20,
                                "target_modules": ["q_proj", "v_proj", "k_proj"]}))
    rewrite(adapter_dir, lambda t: [t.pop(k) for k in list(t) if ".q_proj." in k])
    monkeypatch.setattr(Adapter, "__init__", lambda *a, **k: pytest.fail("an adapter was allocated"))
    base = tiny_llama()
    with pytest.raises(AdapterFormatError, match=r"targets 4 module\(s\) that adapter_model.safetensors has no "
                                                 r"tensors for, e.g. model.layers.0.self_attn.q_proj"):
        PeftModel.from_pretrained(base, adapter_dir)
