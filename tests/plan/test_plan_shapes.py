"""Shapes read without weights equal the models transformers builds: module by module, in total."""

import json

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lorakit.errors import ConfigError
from lorakit.plan import load_shape
from lorakit.plan.catalog import CATALOG

from .tiny import TINY, build, write_config

# Published totals (model cards / print_trainable_parameters of the released checkpoints).
PUBLISHED = {
    "Llama-3-8B": 8_030_261_248, "Llama-3.2-1B": 1_235_814_400, "Mistral-7B-v0.1": 7_241_732_096,
    "Qwen2.5-7B": 7_615_616_512, "Gemma-2-2B": 2_614_341_888, "SmolLM2-135M": 134_515_008,
    "SmolLM2-360M": 361_821_120, "SmolLM2-1.7B": 1_711_376_384, "GPT-2": 124_439_808,
}


def _modules(model) -> set[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of every Linear, Conv1D and Embedding but position embeddings."""
    return {(name, tuple(m.weight.shape)) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Embedding)) and name != "transformer.wpe"}


def _planned_modules(shape) -> set[tuple[str, tuple[int, ...]]]:
    out = set()
    for name, m in shape.modules():
        if m.kind == "linear":  # nn.Linear stores (out, in); Conv1D (in, out); Embedding (num, dim)
            out.add((name, (m.out_features, m.in_features)))
        else:
            out.add((name, (m.in_features, m.out_features)))
    return out


@pytest.mark.parametrize("name", list(CATALOG))
def test_every_built_in_shape_is_the_model_transformers_builds(name):
    shape = load_shape(name)
    model = build(CATALOG[name], meta=True)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert _planned_modules(shape) == _modules(model)
    if name in PUBLISHED:
        assert shape.total_params == PUBLISHED[name]


@pytest.mark.parametrize("arch", list(TINY))
def test_config_json_shapes_match_tiny_models(arch, tmp_path):
    shape = load_shape(write_config(tmp_path, TINY[arch]))
    model = build(TINY[arch], meta=True)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert _planned_modules(shape) == _modules(model)
    assert load_shape(tmp_path).total_params == shape.total_params  # the directory works too


def test_partial_config_json_takes_the_class_defaults(tmp_path):
    # Qwen3's head_dim defaults to 128 whatever the hidden size; a config.json may leave it out.
    fields = dict(model_type="qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    shape = load_shape(tmp_path / "config.json")
    assert shape.head_dim == 128
    assert shape.total_params == sum(p.numel() for p in build(fields, meta=True).parameters())


def test_hub_ids_and_instruct_variants_find_their_base_shape():
    assert load_shape("meta-llama/Meta-Llama-3-8B-Instruct").name == "Llama-3-8B"
    assert load_shape("Qwen/Qwen2.5-7B-Instruct").name == "Qwen2.5-7B"
    assert load_shape("google/gemma-2-2b-it").name == "Gemma-2-2B"
    assert load_shape("HuggingFaceTB/SmolLM2-360M-Instruct").name == "SmolLM2-360M"


def _write_gguf(path, arch: str, kv: dict, tensors: dict):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    for key, value in kv.items():
        getattr(writer, f"add_{key}")(value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_header_gives_the_same_shape_as_the_config(tmp_path):
    fields = TINY["qwen2"]  # tied embeddings, q/k/v biases
    kv = dict(block_count=3, embedding_length=32, feed_forward_length=48, head_count=4,
              head_count_kv=2, context_length=64)
    tensors = {"token_embd.weight": np.zeros((120, 32), np.float32),  # no output.weight: tied
               "blk.0.attn_q.bias": np.zeros(32, np.float32)}
    _write_gguf(tmp_path / "tiny.Q8_0.gguf", "qwen2", kv, tensors)
    from_gguf = load_shape(tmp_path / "tiny.Q8_0.gguf")
    from_config = load_shape(write_config(tmp_path / "cfg", fields))
    assert from_gguf.name == "tiny"
    assert from_gguf.tie_word_embeddings
    assert _planned_modules(from_gguf) == _planned_modules(from_config)
    assert from_gguf.total_params == from_config.total_params


def test_gguf_of_an_unknown_architecture_is_refused(tmp_path):
    _write_gguf(tmp_path / "m.gguf", "mamba", dict(block_count=2), {"x": np.zeros(4, np.float32)})
    with pytest.raises(ConfigError, match="mamba.*supported"):
        load_shape(tmp_path / "m.gguf")


def test_unsupported_or_broken_configs_say_what_to_do(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ConfigError, match="mamba.*supported: llama"):
        load_shape(tmp_path / "a")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="b.json"):
        load_shape(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type"):
        load_shape(tmp_path / "c.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_shape(tmp_path / "empty")


def test_target_names_translate_the_lessons_projections():
    assert load_shape("Phi-3-mini").target_names(["q_proj", "v_proj"]) == ["qkv_proj"]
    assert load_shape("GPT-2").target_names(["o_proj", "down_proj"]) == ["attn.c_proj", "mlp.c_proj"]
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert load_shape("Llama-3-8B").target_names(seven) == seven


def test_layering_core_never_imports_the_planner_and_the_planner_builds_no_model():
    import subprocess
    import sys

    code = (
        "import sys, lorakit, lorakit.config, lorakit.layer, lorakit.inject, lorakit.model, lorakit.io\n"
        "assert not any(m.startswith('lorakit.plan') for m in sys.modules), 'core imports plan'\n"
        "from lorakit.plan import estimate\n"
        "estimate('Qwen2.5-7B', r=16, target_modules='all-linear')\n"
        "models = [m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m and '.auto.' not in m]\n"
        "assert not models, models\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
