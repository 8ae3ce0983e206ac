"""`write_adapter_gguf`: the file llama.cpp's convert_lora_to_gguf.py writes, read back with the
gguf package, and the update it makes llama.cpp apply (scale * B A in the base GGUF's layout)
equal to lorakit's, layer by layer."""

import json
import shutil

import gguf
import pytest
import torch
import transformers

from lorakit import AdaLoraConfig, CompatibilityError, LoraConfig, get_peft_model
from lorakit.config import SEVEN_PROJECTIONS
from lorakit.export.gguf_adapter import llama_cpp_scale, write_adapter_gguf
from lorakit.export.names import permute_rows
from lorakit.inject import lora_layers

N_HEAD, N_HEAD_KV = 4, 2  # the tiny model's (tests/conftest.py)


def _adapted(model_dir, tmp_path, **config):
    """A lorakit model on ``model_dir`` with a non-zero adapter, saved to tmp_path/adapter."""
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = {"r": 4, "lora_alpha": 8, "target_modules": SEVEN_PROJECTIONS, "init_lora_weights": False} | config
    model = get_peft_model(base, LoraConfig(**config))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _export(adapter_dir, tmp_path, model_dir):
    out = tmp_path / "adapter.gguf"
    notes = write_adapter_gguf(adapter_dir, out, model=str(model_dir))
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return notes, fields, tensors, reader


def _gguf_name(module):
    """The llama GGUF tensor of a tiny-model module, written out by hand (not by lorakit.export.names)."""
    layer, leaf = module.split(".")[2], module.rsplit(".", 1)[-1]
    return f"blk.{layer}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[leaf] + ".weight"


def _layers(model):
    """The adapted layers by transformers module name (``model.layers.0.self_attn.q_proj``)."""
    return {name.removeprefix("base_model.model."): layer for name, layer in lora_layers(model)}


def _heads(module):
    return {"q_proj": N_HEAD, "k_proj": N_HEAD_KV}.get(module.rsplit(".", 1)[-1])


def _unpermute(rows, n_head):
    """Inverse of permute_rows: the transformers row order back from llama.cpp's."""
    index = permute_rows(torch.arange(rows.shape[0]), n_head)  # gguf row i holds hf row index[i]
    out = torch.empty_like(rows)
    out[index] = rows
    return out


def _gguf_delta(tensors, name, alpha):
    """The update llama.cpp adds to tensor ``name``: alpha / rank * B A, rank read from lora_b."""
    a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
    return llama_cpp_scale(alpha, b.shape[1]) * (b @ a)


def test_metadata_names_shapes_and_values_match_the_adapter(tiny_model_dir, tmp_path):
    model, adapter_dir = _adapted(tiny_model_dir, tmp_path)
    notes, fields, tensors, reader = _export(adapter_dir, tmp_path, tiny_model_dir)

    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    layers = _layers(model)
    assert len(layers) == 14
    expected = {_gguf_name(m) + s for m in layers for s in (".lora_a", ".lora_b")}
    assert set(tensors) == expected
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    for module, layer in layers.items():
        adapter = layer.adapters["default"]
        a, b = tensors[_gguf_name(module) + ".lora_a"], tensors[_gguf_name(module) + ".lora_b"]
        assert a.shape == adapter.lora_A.shape == (4, layer.base_layer.in_features)  # (r, in)
        assert b.shape == adapter.lora_B.shape == (layer.base_layer.out_features, 4)  # (out, r)
        assert torch.equal(a, adapter.lora_A.detach())
        n_head = _heads(module)
        # alpha / r is llama.cpp's own rule here: nothing folded, B only permuted
        assert torch.equal(_unpermute(b, n_head) if n_head else b, adapter.lora_B.detach())
    q = tensors["blk.0.attn_q.weight.lora_b"]
    assert not torch.equal(q, layers["model.layers.0.self_attn.q_proj"].adapters["default"].lora_B.detach())
    assert any("permuted" in n for n in notes) and not any("folded" in n for n in notes)


def test_q_and_k_updates_are_in_the_base_ggufs_rotary_layout(tiny_model_dir, tmp_path):
    model, adapter_dir = _adapted(tiny_model_dir, tmp_path)
    _, _, tensors, _ = _export(adapter_dir, tmp_path, tiny_model_dir)
    layers = _layers(model)
    for layer_index in range(2):
        for leaf, n_head in (("q_proj", N_HEAD), ("k_proj", N_HEAD_KV)):
            layer = layers[f"model.layers.{layer_index}.self_attn.{leaf}"]
            w_hf = layer.base_layer.weight.detach()
            delta_hf = layer.adapters["default"].delta_weight().detach()  # (out, in)
            w_gguf = permute_rows(w_hf, n_head)  # what llama.cpp's base GGUF holds
            delta = _gguf_delta(tensors, _gguf_name(f"model.layers.{layer_index}.self_attn.{leaf}"), 8.0)
            torch.testing.assert_close(w_gguf + delta, permute_rows(w_hf + delta_hf, n_head), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(delta, permute_rows(delta_hf, n_head), rtol=1e-6, atol=1e-7)
            assert not torch.allclose(delta, delta_hf, atol=1e-3)  # unpermuted would be wrong
            # the projection of an input, as llama.cpp computes it, is the permuted transformers one
            x = torch.randn(3, w_hf.shape[1])
            torch.testing.assert_close(x @ (w_gguf + delta).T, permute_rows(layer(x).detach().T, n_head).T,
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [
    {"use_rslora": True},
    {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 3, "up_proj": 20}},
    {"use_rslora": True, "rank_pattern": {"k_proj": 2, "o_proj": 8}, "alpha_pattern": {"layers.0.mlp.gate_proj": 5}},
], ids=["rslora", "patterns", "rslora-patterns"])
def test_every_layers_scale_is_lorakits(tiny_model_dir, tmp_path, config):
    model, adapter_dir = _adapted(tiny_model_dir, tmp_path, **config)
    notes, fields, tensors, _ = _export(adapter_dir, tmp_path, tiny_model_dir)
    assert fields["adapter.lora.alpha"] == 8.0
    layers = _layers(model)
    ranks, folded = set(), 0
    for module, layer in layers.items():
        adapter = layer.adapters["default"]
        name = _gguf_name(module)
        ranks.add(tensors[name + ".lora_a"].shape[0])
        delta = _gguf_delta(tensors, name, fields["adapter.lora.alpha"])
        n_head = _heads(module)
        delta_hf = adapter.delta_weight().detach()
        torch.testing.assert_close(delta, permute_rows(delta_hf, n_head) if n_head else delta_hf,
                                   rtol=1e-6, atol=1e-7)
        if adapter.scaling != 8.0 / adapter.r:
            folded += 1
            b = tensors[name + ".lora_b"]
            assert not torch.allclose(_unpermute(b, n_head) if n_head else b, adapter.lora_B.detach())
    assert len(ranks) > 1 or config.get("use_rslora")
    assert folded > 0 and any(f"folded into lora_b for {folded} of 14" in n for n in notes)


def test_token_embedding_and_output_head_updates_on_an_untied_base(tiny_model_dir, tmp_path):
    base_dir = tmp_path / "untied"
    _untied_llama(tiny_model_dir, base_dir)
    model, adapter_dir = _adapted(base_dir, tmp_path, target_modules=["embed_tokens", "lm_head", "q_proj"])
    _, _, tensors, _ = _export(adapter_dir, tmp_path, base_dir)
    assert set(tensors) == {f"{n}.{s}" for n in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight",
                                                  "blk.1.attn_q.weight") for s in ("lora_a", "lora_b")}
    layers = _layers(model)
    embed = layers["model.embed_tokens"].adapters["default"]
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a.shape == (128, 4) and b.shape == (32, 4)  # (vocab, r), (dim, r): llama.cpp's layout
    assert torch.equal(a, embed.lora_A.detach().T) and torch.equal(b, embed.lora_B.detach())
    ids = torch.tensor([3, 77, 5])
    # llm_build_inp_embd: scale * B @ get_rows(A, ids)
    llama = (llama_cpp_scale(8.0, b.shape[1]) * (b @ a[ids].T)).T  # (tokens, dim)
    base_rows = layers["model.embed_tokens"].base_layer.weight[ids]
    torch.testing.assert_close(layers["model.embed_tokens"](ids).detach(), base_rows.detach() + llama)
    head = layers["lm_head"]
    torch.testing.assert_close(_gguf_delta(tensors, "output.weight", 8.0), head.adapters["default"].delta_weight())


def _untied_llama(tiny_model_dir, path, **overrides):
    """A tiny Llama with its own output head, and the tiny model's tokenizer files."""
    path.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(item, path / item.name)
    config = transformers.LlamaConfig(**({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV,
                                          "vocab_size": 128, "tie_word_embeddings": False} | overrides))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("config, words", [
    ({"use_dora": True}, ["DoRA", "lorakit export --format gguf", "lorakit merge"]),
    ({"modules_to_save": ["norm"]}, ["modules_to_save", "lorakit export --format gguf"]),
    ({"target_modules": ["embed_tokens", "q_proj"]}, ["model.embed_tokens", "ties", "lorakit export --format gguf"]),
    ({"target_modules": ["lm_head"]}, ["lm_head", "no output.weight", "lorakit merge"]),
], ids=["dora", "modules_to_save", "tied-embedding", "tied-lm_head"])
def test_what_llama_cpp_cannot_apply_is_refused(tiny_model_dir, tmp_path, config, words):
    _, adapter_dir = _adapted(tiny_model_dir, tmp_path, **config)
    out = tmp_path / "adapter.gguf"
    with pytest.raises(CompatibilityError) as err:
        write_adapter_gguf(adapter_dir, out, model=str(tiny_model_dir))
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not out.exists()


def test_trained_biases_and_adalora_are_refused(tiny_model_dir, tmp_path):
    _, adapter_dir = _adapted(tiny_model_dir, tmp_path)
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"bias": "lora_only"}))
    with pytest.raises(CompatibilityError, match="bias='lora_only'.*\n.*lorakit export --format gguf"):
        write_adapter_gguf(adapter_dir, tmp_path / "a.gguf", model=str(tiny_model_dir))

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ada = get_peft_model(base, AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    ada.save_pretrained(tmp_path / "adalora")
    with pytest.raises(CompatibilityError, match="peft_type ADALORA"):
        write_adapter_gguf(tmp_path / "adalora", tmp_path / "b.gguf", model=str(tiny_model_dir))


def test_a_base_of_another_architecture_or_shape_is_refused(tiny_model_dir, tmp_path):
    _, adapter_dir = _adapted(tiny_model_dir, tmp_path)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    shutil.copy(tiny_model_dir / "tokenizer.json", gpt2 / "tokenizer.json")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
                                 ).save_pretrained(gpt2)
    with pytest.raises(CompatibilityError, match="'gpt2'.*lorakit merge"):
        write_adapter_gguf(adapter_dir, tmp_path / "a.gguf", model=str(gpt2))

    wider = _untied_llama(tiny_model_dir, tmp_path / "wider", intermediate_size=96)
    with pytest.raises(CompatibilityError, match=r"model.layers.0.mlp.down_proj: .*\(in, out\) = \(96, 32\)"):
        write_adapter_gguf(adapter_dir, tmp_path / "b.gguf", model=str(wider))
