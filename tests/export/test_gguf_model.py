"""`write_model_gguf`: the merged model as one GGUF, read back by an independent reader.

The reader is transformers' own GGUF support (``from_pretrained(folder, gguf_file=...)``, which
undoes llama.cpp's q/k row order and dequantizes with its own code), never lorakit's, and llama.cpp
itself where llama-cpp-python is installed. Each quantized type is held to a tolerance measured on
these models (the test says which), and the tokenizer lorakit builds from Hugging Face files is
compared with the one inside the shipped SmolLM2 GGUF, key by key.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict, read_gguf_metadata
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import CompatibilityError, ConfigError
from lorakit.export.gguf_model import OUTTYPES, write_model_gguf
from lorakit.models import embedded_gguf_path, load_adapted

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "Remind me to call the dentist next Tuesday, it's urgent! The capital of France is"
MESSAGES = [{"role": "user", "content": "Remind me to call the dentist next Tuesday, it's urgent 🦷 (123 ünïcödé)"},
            {"role": "assistant", "content": '{"title": "Call the dentist", "due_string": "next Tuesday"}'}]

# Against the fp32 PeftModel on the tiny model (19 positions, max |logit| 0.75, top-2 margins up to 0.3):
# max |logit difference| measured f32 1.8e-7, f16 2.2e-4, bf16 1.9e-3, q8_0 6.6e-3, q4_0 7.8e-2 (the bounds
# leave about 3x), and the share of positions with the same top-1 token, measured 1.0 but q4_0 0.89 (17/19;
# a random tiny model's near-ties flip under 4-bit weights).
TINY_TOLERANCE = {"f16": 1e-3, "bf16": 6e-3, "q8_0": 2e-2, "q4_0": 0.2}
TINY_TOP1 = {"f16": 1.0, "bf16": 1.0, "q8_0": 1.0, "q4_0": 0.8}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8


def adapt(model_dir: Path, adapter_dir: Path):
    """A LoRA adapter with non-zero B on all seven projections, saved, then loaded back the way the
    export command loads it: ``(peft_model, tokenizer)``. Merge with ``peft_model.merge_and_unload()``."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=2, init_lora_weights=False, target_modules=TARGETS)
    get_peft_model(base, lora).save_pretrained(adapter_dir)
    return load_adapted(adapter_dir, model=model_dir, dtype=torch.float32)


def read_back(path: Path, like) -> torch.nn.Module:
    """The model in ``path`` as transformers' GGUF loader builds it: `load_gguf_checkpoint`, the
    function ``from_pretrained(gguf_file=)`` reads config and tensors with (reading the file once,
    where from_pretrained reads it twice). ``like``: a model whose parameter names it maps to."""
    read = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=like)
    settings = dict(read["config"])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(read["tensors"], strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    model.tie_weights()
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]  # (T, V)


def rounded(model, outtype: str):
    """A copy of ``model`` whose matrices went through the gguf package's quantizer and back, with the
    types llama.cpp's layout gives them (`test_tensor_layout_is_llama_cpp_s` checks those in the file)."""
    copy = deepcopy(model)
    with torch.no_grad():
        for name, param in copy.named_parameters():
            if param.dim() < 2:
                continue
            kind = "Q8_0" if outtype == "q4_0" and "embed_tokens" in name else outtype.upper()
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            array = param.numpy()
            param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
                                         .reshape(array.shape)))
    return copy


def ggml_types(path: Path) -> dict[str, int]:
    return GgufHeader.from_file(str(path)).ggml_types


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model with an adapter: the PeftModel's logits, then the merged model."""
    peft_model, tokenizer = adapt(tiny_model_dir, tmp_path_factory.mktemp("adapter"))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    reference = logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert (logits(peft_model, ids) - reference).abs().max() > 0.1  # the adapter changes the outputs
    return SimpleNamespace(merged=peft_model.merge_and_unload().eval(), tokenizer=tokenizer, ids=ids,
                           reference=reference, model_dir=tiny_model_dir)


def test_f32_loads_in_transformers_with_the_same_logits_and_tokenizer(tiny, tmp_path):
    notes = write_model_gguf(tiny.merged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf", outtype="f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert (logits(model, tiny.ids) - tiny.reference).abs().max() < 1e-5  # measured 1.8e-7
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(tiny.merged.config, key), key
    assert model.config.rms_norm_eps == pytest.approx(tiny.merged.config.rms_norm_eps)

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = tiny.tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert loaded(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
    assert loaded.chat_template == tiny.tokenizer.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert any("tied to token_embd" in note for note in notes)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_outtypes_load_within_their_measured_tolerance(tiny, tmp_path, outtype):
    write_model_gguf(tiny.merged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf", outtype=outtype)
    got = logits(read_back(tmp_path / "m.gguf", tiny.merged), tiny.ids)
    # the file holds exactly the gguf package's rounding of each merged weight (measured difference 0)
    assert (got - logits(rounded(tiny.merged, outtype), tiny.ids)).abs().max() < 1e-5
    assert (got - tiny.reference).abs().max() < TINY_TOLERANCE[outtype]
    assert (got.argmax(-1) == tiny.reference.argmax(-1)).float().mean() >= TINY_TOP1[outtype]


def test_outtypes_list_the_types_the_gguf_package_can_write():
    assert OUTTYPES == ("f32", "f16", "bf16", "q8_0", "q4_0")


@pytest.mark.parametrize("outtype, matrix, head", [("f16", GGML_F16, GGML_F16), ("q8_0", GGML_Q8_0, GGML_Q8_0),
                                                   ("q4_0", GGML_Q4_0, GGML_Q8_0)])
def test_tensor_layout_is_llama_cpp_s(tiny, tmp_path, outtype, matrix, head):
    """1-D tensors stay f32; a tied model has no output.weight and its token_embd is the output
    head, which q4_0 keeps in q8_0 (llama-quantize's choice, Q6_K unavailable)."""
    write_model_gguf(tiny.merged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf", outtype=outtype)
    types = ggml_types(tmp_path / "m.gguf")
    assert "output.weight" not in types
    assert types["token_embd.weight"] == head
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == types["blk.1.ffn_norm.weight"] == GGML_F32
    assert {types[f"blk.{i}.{t}.weight"] for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                   "ffn_gate", "ffn_up", "ffn_down")} == {matrix}
    assert len(types) == 1 + 1 + 2 * 9
    metadata, _ = read_gguf_metadata(str(tmp_path / "m.gguf"))
    config = tiny.merged.config
    assert {key: metadata[key] for key in metadata if key.startswith("llama.")} == {
        "llama.context_length": 512, "llama.embedding_length": 32, "llama.block_count": 2,
        "llama.feed_forward_length": 64, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.rms_norm_eps),
        "llama.attention.key_length": 8, "llama.attention.value_length": 8, "llama.vocab_size": 49152,
        "llama.rope.dimension_count": 8}
    assert metadata["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[outtype]
    assert (metadata["general.architecture"], metadata["general.type"]) == ("llama", "model")


def test_an_untied_head_is_written_as_output(tiny_model_dir, tmp_path):
    torch.manual_seed(2)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=49152, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    write_model_gguf(model, tokenizer, tiny_model_dir, tmp_path / "m.gguf", outtype="q4_0")
    types = ggml_types(tmp_path / "m.gguf")
    assert (types["output.weight"], types["token_embd.weight"]) == (GGML_Q8_0, GGML_Q4_0)
    write_model_gguf(model, tokenizer, tiny_model_dir, tmp_path / "f.gguf", outtype="f32")
    back = read_back(tmp_path / "f.gguf", model)
    assert not back.config.tie_word_embeddings
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert (logits(back, ids) - logits(model, ids)).abs().max() < 1e-5


def test_tokenizer_built_from_hf_files_equals_the_shipped_gguf_s(tiny, tmp_path):
    """The tiny model's directory holds the default model's Hugging Face tokenizer files and no
    source GGUF, so the vocabulary is built the converter's way; it must equal what llama.cpp's
    converter put in SmolLM2's GGUF."""
    notes = write_model_gguf(tiny.merged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf", outtype="f16")
    assert any("built from" in note and "'smollm'" in note for note in notes)
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours, _ = read_gguf_metadata(str(tmp_path / "m.gguf"), arrays)
    shipped, _ = read_gguf_metadata(str(embedded_gguf_path("smollm2-135m")), arrays)
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == shipped[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == shipped["tokenizer.chat_template"]


def test_llama3_rope_scaling_writes_the_frequency_factors_transformers_applies(tiny_model_dir, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=49152, max_position_embeddings=512, rope_parameters=rope)
    model = LlamaForCausalLM(config).eval()
    write_model_gguf(model, AutoTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir, tmp_path / "m.gguf",
                     outtype="f16")
    header = GgufHeader.from_file(str(tmp_path / "m.gguf"))
    factors = load_gguf_state_dict(header)["rope_freqs.weight"][...]  # llama.cpp divides theta_i by these
    assert header.ggml_types["rope_freqs.weight"] == GGML_F32
    dim = config.head_dim  # 32
    default = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # unscaled inv_freq
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.allclose(default / factors, scaled, rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the smoothing appear


@pytest.mark.parametrize("make", [
    lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=49152)),
    lambda: Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=49152)),
], ids=["gpt2", "qwen2"])
def test_a_base_outside_the_llama_family_is_refused(tiny, tmp_path, make):
    with pytest.raises(CompatibilityError, match="gpt2|qwen2"):
        write_model_gguf(make(), tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_an_unmerged_model_and_an_unknown_outtype_are_refused(tiny, tmp_path):
    unmerged = get_peft_model(LlamaForCausalLM(tiny.merged.config), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(CompatibilityError, match="merge_and_unload"):
        write_model_gguf(unmerged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="q4_0"):
        write_model_gguf(tiny.merged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf", outtype="q4_k")
    assert not (tmp_path / "m.gguf").exists()


def test_llama_cpp_loads_it_with_the_same_tokens_and_logits(tiny, tmp_path):
    """llama.cpp itself, where its Python binding is installed (not a test dependency: it compiles
    llama.cpp; ``pip install llama-cpp-python``). Measured with llama-cpp-python 0.3.36: the same ids,
    max |diff| 5.9e-4 for f16 (f32 1.6e-4: llama.cpp's own kernels), the same top-1 everywhere."""
    llama_cpp = pytest.importorskip("llama_cpp")
    write_model_gguf(tiny.merged, tiny.tokenizer, tiny.model_dir, tmp_path / "m.gguf", outtype="f16")
    text = tiny.tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    ids = tiny.tokenizer(text)["input_ids"]
    with torch.no_grad():
        reference = tiny.merged(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, n_batch=256, logits_all=True, n_threads=1,
                          verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[:len(ids)])
    assert (got - reference).abs().max() < 2e-3
    assert torch.equal(got.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_default_model_f16_loads_in_transformers_with_the_same_logits_and_tokenizer(default_model_dir, tmp_path):
    peft_model, tokenizer = adapt(default_model_dir, tmp_path / "adapter")
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    reference = logits(peft_model, ids)
    merged = peft_model.merge_and_unload().eval()
    notes = write_model_gguf(merged, tokenizer, default_model_dir, tmp_path / "m.gguf", outtype="f16")
    assert any(note.startswith("tokenizer: copied from") for note in notes)

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    got = logits(model, ids)
    # measured on 78 positions: max |diff| 0.053 on logits up to 38.4, the same top-1 token at every position
    # (f32 gives 1.2e-4; q8_0 1.9 and 97%, q4_0 23 and 68%: this 135M model loses much to 4-bit weights)
    assert (got - reference).abs().max() < 0.2
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.97

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
