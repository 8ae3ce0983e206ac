"""The embedded default model, for real: converted once, reloaded from the cache, answers Paris."""

import pytest
import torch

from lorakit.models import load, load_model

pytestmark = pytest.mark.slow


def test_default_model_converted_once_to_a_complete_directory(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [p for p in default_model_dir.parent.iterdir() if p.name.startswith(".partial-")]
    assert "quantization_config" not in (default_model_dir / "config.json").read_text()


def test_reload_uses_the_cache_and_answers_paris(default_model_dir, monkeypatch):
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("the cached directory should have been used")

    monkeypatch.setattr(load, "convert_gguf", no_conversion)
    model, tokenizer = load_model()
    assert weights.stat().st_mtime_ns == before

    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert next(model.parameters()).dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."
