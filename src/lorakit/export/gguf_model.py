"""`lorakit export --format gguf`: a merged model as one GGUF file that llama.cpp and Ollama load.

The file is what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama-family model:

    general.*        architecture "llama", type "model", name, size_label, file_type, quantization_version
    llama.*          context_length, embedding_length, block_count, feed_forward_length,
                     attention.head_count(_kv), attention.layer_norm_rms_epsilon,
                     attention.key_length / value_length, rope.freq_base, rope.dimension_count,
                     vocab_size (and rope.scaling.type / factor for linear rope scaling)
    tokenizer.*      the vocabulary, merges, special ids and chat template (below)
    tensors          token_embd, blk.<i>.attn_q / k / v / output, ffn_gate / up / down,
                     attn_norm / ffn_norm, output_norm, output (absent when tied to token_embd),
                     rope_freqs for Llama-3 rope scaling

Tensor types (``outtype``): 1-D tensors (norms, biases, rope_freqs) stay float32, as llama.cpp
keeps them; the rest take ``outtype``. q4_0 is not a type of the converter but of
``llama-quantize``, which gives the output head (the token embedding when tied) Q6_K, or Q8_0
when its rows are not a multiple of 256; the gguf package cannot write Q6_K, so it gets Q8_0.
A tensor whose rows do not split into blocks falls back to f16, as the converter does.

Llama-family q_proj / k_proj rows are stored in llama.cpp's rotary order (`lorakit.export.names`).

The tokenizer: a model directory converted from a GGUF (the embedded default) records its source
file; its ``tokenizer.*`` keys are copied unchanged. Otherwise they are built from the Hugging Face
tokenizer as the converter builds a byte-level BPE ("gpt2") vocabulary: tokens by id, types
(normal 1, control 3 for special added tokens, user-defined 4 for other added tokens, unused 5
for ids without a token), merges from tokenizer.json, the pre-tokenizer named by the hash of a
fixed text's ids (`PRE_TOKENIZERS`), bos / eos / unk / pad ids, and the chat template.
"""

from __future__ import annotations

import json
import math
from hashlib import sha256
from pathlib import Path

import torch

from lorakit.errors import CompatibilityError, ConfigError
from lorakit.export.names import GgufNames, gguf_names, permute_rows
from lorakit.models.gguf import source_gguf

__all__ = ["OUTTYPES", "PRE_TOKENIZERS", "write_model_gguf"]

# outtype -> (GGMLQuantizationType name for the matrices, LlamaFileType name for general.file_type)
_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
OUTTYPES = tuple(_TYPES)
"""The tensor types a merged GGUF can take (``--outtype``)."""

_ROPE_TYPES = ("default", "linear", "llama3")  # what llama.cpp's llama architecture computes as transformers does

# The text llama.cpp's converter tokenizes to name a BPE pre-tokenizer (get_vocab_base_pre).
_PRE_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
             "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
             "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
             "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
             "I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}
"""sha256 of ``str(tokenizer.encode(text))`` -> ``tokenizer.ggml.pre``: the byte-level BPE
pre-tokenizers of Llama-family models, from llama.cpp's convert_hf_to_gguf.py."""

_CONVERT_INSTEAD = "merge it (lorakit merge) and convert the merged directory with llama.cpp's convert_hf_to_gguf.py"


def write_model_gguf(model, tokenizer, model_dir: Path, out_file: Path, *, outtype: str = "f16") -> list[str]:
    """Write ``model`` (a merged, plain transformers causal LM; fp32 is exact) with ``tokenizer``
    as the one GGUF file ``out_file``; ``model_dir`` is the base model's directory (its tokenizer
    files, or the GGUF it was converted from). Returns short notes on what was written."""
    import gguf  # heavy: imported on first use

    if outtype not in _TYPES:
        raise ConfigError(f"outtype {outtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    config = model.config
    names = gguf_names(config)  # CompatibilityError for an architecture without GGUF names
    rope = _check_config(config, names)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    tensors, tied = _gguf_tensors(model, names, rope)

    model_dir = Path(model_dir)
    source = source_gguf(model_dir)
    reader = gguf.GGUFReader(source) if source is not None else None
    name = reader.fields.get("general.name") if reader is not None else None

    writer = gguf.GGUFWriter(Path(out_file), names.arch)  # writes general.architecture
    notes = _add_tensors(writer, tensors, outtype)
    if tied:
        notes.append("output: tied to token_embd (no output.weight), as llama.cpp's converter writes tied models")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name.contents() if name is not None else model_dir.name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    _add_hparams(writer, config, rope, vocab_size, getattr(gguf.LlamaFileType, _TYPES[outtype][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    copied = reader is not None and _copy_tokenizer(writer, reader, vocab_size)
    if copied:
        notes.append(f"tokenizer: copied from {source}")
    else:
        if reader is not None:
            notes.append(f"tokenizer: {source} does not hold {vocab_size} tokens (the model's vocabulary); built "
                         "from the Hugging Face tokenizer instead")
        notes += _add_hf_tokenizer(writer, tokenizer, model_dir, vocab_size)
    sliding = getattr(config, "sliding_window", None)
    if sliding and sliding < config.max_position_embeddings:
        notes.append(f"sliding_window {sliding}: llama.cpp's llama architecture attends to the whole context, so "
                     f"outputs differ from transformers beyond {sliding} tokens")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes


def _check_config(config, names: GgufNames) -> dict:
    """The model's rope parameters, after refusing what llama.cpp's llama architecture would compute
    differently (every problem in one error)."""
    problems = []
    if names.arch != "llama":
        problems.append(f"a merged GGUF is written for Llama-family bases (llama, mistral); this base is "
                        f"{config.model_type!r}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r}: llama.cpp's llama architecture uses silu")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        problems.append(f"rope type {rope_type!r}: lorakit writes {', '.join(_ROPE_TYPES)}")
    if problems:
        raise CompatibilityError("cannot write this model as a GGUF: " + "; ".join(problems) + f"; {_CONVERT_INSTEAD}")
    rope["rope_type"] = rope_type
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope.setdefault("original_max_position_embeddings", config.max_position_embeddings)  # as transformers reads it
    return rope


def _gguf_tensors(model, names: GgufNames, rope: dict) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    """``[(gguf name, fp32 tensor in llama.cpp's layout)]`` for the model's state dict, and whether
    the output head is tied to (equal to) the token embedding and so left out."""
    state = model.state_dict()
    adapter = [key for key in state if ".lora_" in key or ".base_layer." in key]
    if adapter:
        raise CompatibilityError(f"the model still holds adapter layers ({adapter[0]}, ...); pass the merged "
                                 "model: model.merge_and_unload()")
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and (head.weight is embed or torch.equal(head.weight, embed))
    out, unmapped = [], []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if key.endswith("rotary_emb.inv_freq"):  # recomputed from the hparams
            continue
        try:
            name = f"{names.tensor(module)}.{param}"
        except CompatibilityError:
            unmapped.append(key)
            continue
        if tied and name.startswith("output."):
            continue
        data = tensor.detach().to("cpu", torch.float32)
        if (n_head := names.rows_permutation(module)) is not None:
            data = permute_rows(data, n_head)
        out.append((name, data))
    if unmapped:
        raise CompatibilityError(f"no {names.arch} GGUF tensor corresponds to {', '.join(unmapped)}; "
                                 f"llama.cpp could not load them; {_CONVERT_INSTEAD}")
    if rope["rope_type"] == "llama3":
        out.append(("rope_freqs.weight", _llama3_rope_factors(rope)))
    return out, tied


def _llama3_rope_factors(rope: dict) -> torch.Tensor:
    """Llama 3's per-frequency rope divisors, as llama.cpp's converter computes them (its
    ``rope_freqs`` tensor: ``inv_freq / factor`` is the frequency llama.cpp uses)."""
    dim, base = rope["head_dim"], rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tensor_type(name: str, ndim: int, outtype: str, head: bool) -> str:
    """The GGML type of one tensor: float32 for 1-D tensors and norms (llama.cpp reads them so),
    Q8_0 for the output head under q4_0 (llama-quantize's choice; see the module docstring; ``head``:
    output.weight, or token_embd.weight when tied), else outtype's."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    if outtype == "q4_0" and head:
        return "Q8_0"
    return _TYPES[outtype][0]


def _add_tensors(writer, tensors: list[tuple[str, torch.Tensor]], outtype: str) -> list[str]:
    """Quantize and add each tensor; notes on the types written."""
    import gguf  # heavy: imported on first use
    import numpy as np  # with gguf

    has_output = any(name == "output.weight" for name, _ in tensors)
    counts: dict[str, int] = {}
    fell_back = []
    for name, data in tensors:
        head = name == "output.weight" or (name == "token_embd.weight" and not has_output)
        kind = _tensor_type(name, data.dim(), outtype, head)
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        array = data.numpy()
        try:
            packed = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # rows that do not split into blocks: the converter's fallback
            qtype, kind = gguf.GGMLQuantizationType.F16, "F16"
            packed = gguf.quants.quantize(array, qtype)
            fell_back.append(name)
        writer.add_tensor(name, np.ascontiguousarray(packed), raw_dtype=qtype)
        counts[kind] = counts.get(kind, 0) + 1
    listed = ", ".join(f"{n} {kind.lower()}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    notes = [f"tensors: {len(tensors)} ({listed}; 1-D tensors and norms stay f32)"]
    if fell_back:
        notes.append(f"{len(fell_back)} tensors fell back to f16 (rows not a multiple of the {outtype} block): "
                     f"{', '.join(fell_back[:4])}{', ...' if len(fell_back) > 4 else ''}")
    return notes


def _add_hparams(writer, config, rope: dict, vocab_size: int, file_type: int) -> None:
    """The ``llama.*`` keys, as the converter's TextModel / LlamaModel.set_gguf_parameters write them."""
    import gguf  # heavy: imported on first use

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(rope["head_dim"])
    writer.add_value_length(rope["head_dim"])
    writer.add_file_type(file_type)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(rope["head_dim"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _copy_tokenizer(writer, reader, vocab_size: int) -> bool:
    """Copy the ``tokenizer.*`` keys of a source GGUF unchanged, when its vocabulary is the model's."""
    import gguf  # heavy: imported on first use

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        return False
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    return True


def _add_hf_tokenizer(writer, tokenizer, model_dir: Path, vocab_size: int) -> list[str]:
    """A byte-level BPE vocabulary from ``tokenizer`` and ``model_dir/tokenizer.json``, as
    convert_hf_to_gguf.py's ``_set_vocab_gpt2`` builds it."""
    import gguf  # heavy: imported on first use

    spec_file = model_dir / "tokenizer.json"
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise CompatibilityError(f"{spec_file}: lorakit builds GGUF vocabularies for byte-level BPE tokenizers "
                                 f"(GPT-2 style tokenizer.json); this one is not (or is missing); {_CONVERT_INSTEAD}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CompatibilityError(f"the tokenizer in {model_dir} has ids up to {max(vocab.values())}, the model's "
                                 f"embedding only {vocab_size} rows; pass the tokenizer that belongs to this model")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if index not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[index].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    digest = sha256(str(tokenizer.encode(_PRE_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest, "default")

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                          tokenizer.eos_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    plain, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": key, "template": value} for key, value in template.items()]
    if template:
        writer.add_chat_template(template)
    notes = [f"tokenizer: built from {model_dir} (byte-level BPE, pre-tokenizer {pre!r}, {len(merges)} merges)"]
    if pre == "default":
        notes.append("tokenizer.ggml.pre: the pre-tokenizer is not one lorakit knows; llama.cpp will split text "
                     f"with its default rules, which may tokenize differently; {_CONVERT_INSTEAD}")
    return notes
