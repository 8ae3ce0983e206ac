"""`lorakit export --format gguf-adapter`: a LoRA adapter as the GGUF file llama.cpp loads with ``--lora``.

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes, and what its loader
(``llama-adapter.cpp``) checks:

    general.architecture    the base's GGUF architecture ("llama" for Llama and Mistral)
    general.type            "adapter"
    adapter.type            "lora"
    adapter.lora.alpha      float32, one value for the whole file
    <base tensor>.lora_a    (r, in)   e.g. blk.0.attn_q.weight.lora_a   (numpy order; ggml ne = [in, r])
    <base tensor>.lora_b    (out, r)  e.g. blk.0.attn_q.weight.lora_b   (ggml ne = [r, out])
    token_embd.weight.lora_a  (vocab, r): lora_embedding_A transposed (llm_build_inp_embd gathers rows)
    token_embd.weight.lora_b  (dim, r):   lora_embedding_B

llama.cpp computes ``y = W x + s * B (A x)`` with ``s = alpha / rank`` (``alpha`` the file's, ``rank``
read per tensor from lora_b; ``s = 1`` when alpha is 0). lorakit's (PEFT's) scale is per layer:
``alpha_l / r_l``, or ``alpha_l / sqrt(r_l)`` with rsLoRA, ``alpha_l`` and ``r_l`` from
``alpha_pattern`` / ``rank_pattern``. Where the two differ, the ratio is folded into B:

    B_gguf = B * (scale_l / s_l),    so    s_l * B_gguf A = scale_l * B A

Llama-family q_proj / k_proj rows are stored in llama.cpp's rotary order (`lorakit.export.names`):
B's rows are permuted the same way, A is not. Tensors are written as float32 (the converter's
default ``--outtype f32``). What llama.cpp cannot apply (DoRA, trained biases or modules, AdaLoRA,
PiSSA/OLoRA adapters that need a residual base, a module the base GGUF has no tensor for) is
refused with the alternative: export the merged model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFormatError, CompatibilityError
from lorakit.export.names import GgufNames, gguf_names, permute_rows
from lorakit.inject import pattern_value
from lorakit.io import BASE_PRECISION_KEY, PREFIX, read_adapter, read_metadata
from lorakit.models import base_model_for, resolve_model_dir
from lorakit.variants.inits import uses_base_weight

__all__ = ["write_adapter_gguf", "llama_cpp_scale", "lorakit_scale", "LORA_A", "LORA_B"]

LORA_A = ".lora_a"
"""Suffix of the A tensor after the base tensor's name (``blk.0.attn_q.weight.lora_a``)."""
LORA_B = ".lora_b"

MERGE_INSTEAD = ("export the merged model instead: `lorakit export --format gguf` (merges the adapter into the "
                 "base and writes one GGUF), or `lorakit merge` and llama.cpp's convert_hf_to_gguf.py")

# adapter-file key suffix -> (kind, A or B)
_PAIR_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B"),
}
_BASE_TABLE = ".base_layer.weight"
"""The frozen base table of a targeted embedding or output head, saved beside the adapter as PEFT
does; llama.cpp's converter skips it (the base GGUF holds the same table), and so does this writer."""


@dataclass(frozen=True)
class _Pair:
    """One adapted module of the adapter file: its A (r, in) and B (out, r)."""

    module: str
    kind: str  # "linear" or "embedding"
    a: torch.Tensor
    b: torch.Tensor


def llama_cpp_scale(file_alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a tensor pair: ``alpha / rank`` in float32, or 1 when the
    file's alpha is 0 (``llama_adapter_lora_weight::get_scale``)."""
    alpha = torch.tensor(file_alpha, dtype=torch.float32)
    if alpha.item() == 0:
        return 1.0
    return (alpha / torch.tensor(float(rank), dtype=torch.float32)).item()


def lorakit_scale(config: LoraConfig, module: str, rank: int) -> float:
    """The scale lorakit (and PEFT) give ``module``'s update: ``alpha / r``, or ``alpha / sqrt(r)``
    with rsLoRA, ``alpha`` from ``alpha_pattern`` (the rank comes from the tensors)."""
    alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _config_refusals(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What in the adapter itself llama.cpp's LoRA GGUF cannot hold, one line each."""
    problems = []
    if config.peft_type != LoraConfig.PEFT_TYPE:
        problems.append(f"peft_type {config.peft_type}: a llama.cpp LoRA GGUF holds plain LoRA pairs "
                        "(lora_a, lora_b) only")
        return problems  # its tensors are another method's; nothing below applies
    if config.use_dora or any(k.endswith(".lora_magnitude_vector") for k in tensors):
        problems.append("DoRA (use_dora, lora_magnitude_vector): llama.cpp adds scale * B A and has no "
                        "magnitude vector")
    if config.modules_to_save:
        problems.append(f"modules_to_save={sorted(config.modules_to_save)}: fully trained modules have no "
                        "place in a LoRA GGUF (llama.cpp loads .lora_a / .lora_b tensors only)")
    if config.bias != "none":
        problems.append(f"bias={config.bias!r}: trained biases have no place in a LoRA GGUF (llama.cpp loads "
                        ".lora_a / .lora_b tensors only)")
    if uses_base_weight(config.init_lora_weights):
        problems.append(f"init_lora_weights={config.init_lora_weights!r}: this adapter applies to the residual "
                        "base W - scale * B0 A0, not to the original base llama.cpp loads; save it converted "
                        "(save_pretrained(dir, path_initial_model_for_weight_conversion=<initial adapter>))")
    other = sorted(k for k in tensors if not any(k.endswith(s) for s in _PAIR_SUFFIXES)
                   and not k.endswith((".lora_magnitude_vector", _BASE_TABLE)))
    if other and not problems:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        problems.append(f"tensors other than LoRA pairs ({shown}; whole embedding tables mean a resized "
                        "vocabulary): llama.cpp loads .lora_a / .lora_b only")
    return problems


def _pairs(tensors: dict[str, torch.Tensor], source: Path) -> list[_Pair]:
    """The adapter's (A, B) pairs by module, in file order; AdapterFormatError for half a pair,
    a mis-shaped, non-float or non-finite tensor."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    problems, pairs = [], []
    for key, tensor in tensors.items():
        suffix = next((s for s in _PAIR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        if not key.startswith(PREFIX):
            problems.append(f"{key}: a LoRA key must start with {PREFIX!r} (PEFT's layout)")
            continue
        module = key[len(PREFIX):-len(suffix)]
        kinds[module], which = _PAIR_SUFFIXES[suffix]
        parts.setdefault(module, {})[which] = tensor
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        a, b = ab["A"], ab["B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{module}: A is {a.dtype}, B is {b.dtype}; LoRA weights are floating point")
        elif a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r)")
        elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            problems.append(f"{module}: A or B holds NaN or infinite values")
        else:
            pairs.append(_Pair(module, kinds[module], a.float(), b.float()))
    if problems:
        raise AdapterFormatError(f"{source}: the adapter's tensors are unusable:\n  - " + "\n  - ".join(problems))
    if not pairs:
        raise AdapterFormatError(f"{source}: the adapter holds no LoRA pairs (lora_A / lora_B) to export")
    return pairs


def _base(adapter_dir: Path, model: str | os.PathLike | None):
    """(model directory, transformers config, meta-device model) of the base the adapter goes on."""
    import transformers  # heavy: imported on first use

    model_dir = resolve_model_dir(base_model_for(adapter_dir, model))
    base_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):  # shapes and tying only, no memory
        base = transformers.AutoModelForCausalLM.from_config(base_config)
    return model_dir, base_config, base


def _base_refusals(pairs: list[_Pair], names: GgufNames, base: torch.nn.Module, model_dir: Path) -> list[str]:
    """Where the adapter does not fit the base's GGUF: a module the base lacks or has another shape,
    no GGUF tensor for a module, an update to a tied embedding or output head."""
    modules = dict(base.named_modules())
    out_head, in_embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = out_head is not None and in_embed is not None and out_head.weight is in_embed.weight
    problems = []
    for pair in pairs:
        module = modules.get(pair.module)
        if module is None:
            problems.append(f"{pair.module}: the base {model_dir} has no such module (an adapter for another "
                            "base model? pass the base it was trained on with --model)")
            continue
        if pair.kind == "embedding":
            dims = (getattr(module, "num_embeddings", None), getattr(module, "embedding_dim", None))
        else:
            dims = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if dims != (pair.a.shape[1], pair.b.shape[0]):
            problems.append(f"{pair.module}: the adapter's A {tuple(pair.a.shape)} and B {tuple(pair.b.shape)} "
                            f"do not fit the base's layer (in, out) = {dims} (an adapter for another base model?)")
            continue
        try:
            names.tensor(pair.module)
        except CompatibilityError as err:
            problems.append(str(err))
            continue
        if tied and module is out_head:
            problems.append(f"{pair.module}: the base ties its output head to the token embeddings, so its "
                            "GGUF has no output.weight for llama.cpp to apply this update to")
        elif tied and module is in_embed:
            problems.append(f"{pair.module}: the base ties the token embeddings to its output head; llama.cpp "
                            "finds LoRA tensors by name and would apply token_embd's update to the output head too")
    return problems


def _gguf_pair(pair: _Pair, names: GgufNames, factor: float) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The GGUF base tensor name and (lora_a, lora_b) in llama.cpp's layout for one module."""
    a, b = pair.a, pair.b  # (r, in), (out, r)
    if factor != 1.0:
        b = b * factor  # (out, r)
    n_head = names.rows_permutation(pair.module)
    if n_head is not None:
        b = permute_rows(b, n_head)  # rows in llama.cpp's rotary order
    if pair.kind == "embedding":
        a = a.T  # (vocab, r): llama.cpp gathers A's rows by token id (llm_build_inp_embd)
    return names.tensor(pair.module) + ".weight", a.contiguous(), b.contiguous()


def _write(out_file: Path, arch: str, alpha: float, name: str,
           tensors: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    import gguf  # heavy: imported on first use

    writer = gguf.GGUFWriter(out_file, arch)  # writes general.architecture
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for base_name, a, b in tensors:
        writer.add_tensor(base_name + LORA_A, a.numpy())
        writer.add_tensor(base_name + LORA_B, b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_adapter_gguf(adapter_dir: Path, out_file: Path, *, model: str | None = None) -> list[str]:
    """Write the adapter in ``adapter_dir`` to ``out_file`` as a llama.cpp LoRA GGUF (load it with
    ``llama-cli -m base.gguf --lora out_file``) and return notes on what was done.

    ``model``: the base model (a local directory, a .gguf file or an embedded name); by default the
    adapter's ``base_model_name_or_path``, else the embedded default. Only its config is read.
    Raises `CompatibilityError` for what llama.cpp cannot apply (see the module docstring),
    `AdapterFormatError` for a broken adapter."""
    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    config, tensors = read_adapter(adapter_dir)
    problems = _config_refusals(config, tensors)
    if problems:
        raise CompatibilityError(f"{adapter_dir}: cannot be written as a llama.cpp LoRA GGUF:\n  - "
                                 + "\n  - ".join(problems) + "\n" + MERGE_INSTEAD)
    pairs = _pairs(tensors, adapter_dir)
    wrong_rank = [f"{p.module}: the config gives r={r}, the tensors r={p.a.shape[0]}" for p in pairs
                  if (r := pattern_value(config.rank_pattern, p.module, config.r)) != p.a.shape[0]]
    if wrong_rank:
        raise AdapterFormatError(f"{adapter_dir}: adapter_config.json's r / rank_pattern disagree with the "
                                 "weights (fix the config to the rank the adapter was trained with):\n  - "
                                 + "\n  - ".join(wrong_rank))
    model_dir, base_config, base = _base(adapter_dir, model)
    names = gguf_names(base_config)  # CompatibilityError for an architecture it does not know
    problems = _base_refusals(pairs, names, base, model_dir)
    if problems:
        raise CompatibilityError(f"{adapter_dir}: cannot be written as a llama.cpp LoRA GGUF for {model_dir}:\n  - "
                                 + "\n  - ".join(problems) + "\n" + MERGE_INSTEAD)

    order = {name: i for i, name in enumerate(dict(base.named_modules()))}
    pairs.sort(key=lambda p: order[p.module])  # the base's layer order, as the base GGUF lists them
    file_alpha = float(config.lora_alpha)
    folded, written = {}, []
    for pair in pairs:
        rank = pair.a.shape[0]
        scale, llama = lorakit_scale(config, pair.module, rank), llama_cpp_scale(file_alpha, rank)
        same_rule = (not config.use_rslora and file_alpha != 0
                     and pattern_value(config.alpha_pattern, pair.module, config.lora_alpha) == config.lora_alpha)
        factor = 1.0 if same_rule else scale / llama  # llama.cpp computes this layer's alpha / r itself
        if factor != 1.0:
            folded[pair.module] = (scale, llama)
        written.append(_gguf_pair(pair, names, factor))
    _write(out_file, names.arch, file_alpha, adapter_dir.resolve().name, written)
    return _notes(config, tensors, pairs, names, folded, model_dir, adapter_dir, out_file)


def _notes(config: LoraConfig, tensors: dict[str, torch.Tensor], pairs: list[_Pair], names: GgufNames,
           folded: dict[str, tuple[float, float]], model_dir: Path, adapter_dir: Path, out_file: Path) -> list[str]:
    """What the export did, one short line each, for the command to print."""
    file_alpha = float(config.lora_alpha)
    notes = [f"{len(pairs)} LoRA pairs for a {names.arch} base ({model_dir}), float32, "
             f"adapter.lora.alpha = {file_alpha:g} (the config's lora_alpha)"]
    tables = sorted(k[len(PREFIX):-len(_BASE_TABLE)] for k in tensors if k.endswith(_BASE_TABLE))
    if tables:
        notes.append(f"the saved base tables of {', '.join(tables)} left out: llama.cpp uses the base GGUF's")
    if folded:
        module, (scale, llama) = next(iter(folded.items()))
        why = ", ".join(w for w, on in (("rsLoRA alpha/sqrt(r)", config.use_rslora),
                                        ("alpha_pattern", bool(config.alpha_pattern)),
                                        ("lora_alpha 0", file_alpha == 0)) if on)
        notes.append(f"scale folded into lora_b for {len(folded)} of {len(pairs)} layers ({why}): llama.cpp "
                     f"scales by alpha/rank, e.g. {module}: lorakit's {scale:g} = llama.cpp's {llama:g} "
                     f"x {scale / llama:g}")
    permuted = sum(names.rows_permutation(p.module) is not None for p in pairs)
    if permuted:
        notes.append(f"lora_b rows of {permuted} q_proj/k_proj layers permuted into llama.cpp's rotary order")
    precision = read_metadata(adapter_dir).get(BASE_PRECISION_KEY)
    if precision:
        notes.append(f"trained on a {precision} base: llama.cpp applies it to whatever base GGUF you load; "
                     "a base quantized differently gives slightly different outputs")
    notes.append("llama.cpp's --lora-scaled FILE S multiplies the update by S")
    return notes
