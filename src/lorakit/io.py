"""The adapter directory: the one place that knows PEFT's file layout and key names.

    <dir>/adapter_config.json         LoraConfig, sorted keys, inference_mode true
    <dir>/adapter_model.safetensors   base_model.model.<module>.lora_A.weight        (r, in)
                                      base_model.model.<module>.lora_B.weight        (out, r)
                                      base_model.model.<module>.lora_magnitude_vector (out,) DoRA
                                      (a method's own keys: `lorakit.plugins.Method.layer_tensors`,
                                      e.g. AdaLoRA's <module>.lora_A / lora_E / lora_B)
                                      base_model.model.<module>.lora_embedding_A     (r, vocab)
                                      base_model.model.<module>.lora_embedding_B     (dim, r)
                                      base_model.model.<module>.base_layer.bias      bias modes
                                      base_model.model.<module>.<param>              modules_to_save
                                      metadata {"format": "pt"}, and on a quantized base
                                      {"lorakit.base_precision": "nf4" | "fp4" | "int8"}
    An adapter not named "default" lives in <dir>/<name>/.

Loading is strict: every missing, unexpected, mis-shaped, non-float or non-finite tensor is
collected and reported in one error. Pickled ``adapter_model.bin`` files are refused unread.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.errors import AdapterFormatError, CompatibilityError, ConfigError
from lorakit.inject import ModulesToSave, bias_parameters, logical_modules, match_targets, pattern_value, resolve_targets
from lorakit.layer import LoraLayer, is_conv1d
from lorakit.plugins import method_for, quantized_base

__all__ = [
    "WEIGHTS_NAME", "PREFIX", "adapter_tensors", "save_adapter", "read_adapter",
    "load_adapter_tensors", "adapter_subdir", "check_adapter_name", "lora_layer_tensors",
    "check_shapes_before_injection", "BASE_PRECISION_KEY", "base_precision", "read_metadata",
]

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

BASE_PRECISION_KEY = "lorakit.base_precision"
"""The safetensors metadata key that records how the base an adapter was saved on was stored
(PEFT reads the file as usual and ignores the key)."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> str:
    """Adapter names become directory names and module keys: letters, digits, '_' and '-'."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-' only "
            "(it names a sub-directory and must stay inside the adapter directory)"
        )
    return name


def adapter_subdir(directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where an adapter is stored: the directory itself for "default", else ``dir/<name>``."""
    directory = Path(directory)
    if adapter_name == "default":
        return directory
    return directory / check_adapter_name(adapter_name)


def _embedding_targeted(config: LoraConfig, model: nn.Module) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n, _ in logical_modules(model)
                   if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def adapter_tensors(model: nn.Module, adapter_name: str, config: LoraConfig,
                    save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file keys, as live parameters of ``model`` (the user's
    model with LoRA layers injected). Saving reads them; loading copies into them."""
    tensors: dict[str, torch.Tensor] = {}
    lora_layer_names = []
    layer_tensors = method_for(config.peft_type).layer_tensors  # the method's own keys
    for name, module in logical_modules(model):
        if isinstance(module, ModulesToSave):
            if adapter_name in module.modules_to_save:
                for pname, p in module.modules_to_save[adapter_name].named_parameters():
                    tensors[f"{PREFIX}{name}.{pname}"] = p
        elif isinstance(module, LoraLayer) and adapter_name in module.adapters:
            lora_layer_names.append(name)
            tensors.update(layer_tensors(f"{PREFIX}{name}", name, module, module.adapters[adapter_name], config))
    if config.bias == "all":
        for name, p in bias_parameters(model):
            tensors[PREFIX + name] = p
        # PEFT saves every bias of the state dict, the frozen original of a modules_to_save
        # wrapper included.
        for name, module in _modules_to_save(model, adapter_name):
            for pname, p in module.original_module.named_parameters():
                if pname.rsplit(".", 1)[-1] == "bias":
                    tensors[f"{PREFIX}{name}.original_module.{pname}"] = p
    elif config.bias == "lora_only":
        for name in lora_layer_names:
            bias = getattr(model.get_submodule(name).base_layer, "bias", None)
            if bias is not None:
                tensors[f"{PREFIX}{name}.base_layer.bias"] = bias
    targeted = _embedding_targeted(config, model)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted
    if save_embedding_layers:
        tensors.update(_embedding_tensors(model, targeted))
    return tensors


def lora_layer_tensors(key: str, module_name: str, layer: LoraLayer, a: nn.Module,
                       config: LoraConfig) -> dict[str, torch.Tensor]:
    """LORA's tensors of one layer (`lorakit.plugins.Method.layer_tensors`): PEFT's keys
    ``<key>.lora_A.weight`` / ``.lora_B.weight``, ``<key>.lora_embedding_A`` / ``_B`` for an
    embedding, and DoRA's ``<key>.lora_magnitude_vector``."""
    if layer.is_embedding:
        tensors = {f"{key}.lora_embedding_A": a.lora_A, f"{key}.lora_embedding_B": a.lora_B}
    else:
        tensors = {f"{key}.lora_A.weight": a.lora_A, f"{key}.lora_B.weight": a.lora_B}
    if a.lora_magnitude_vector is not None:
        # PEFT's "<module>.lora_magnitude_vector.<adapter>.weight", the adapter name stripped
        # together with ".weight" (peft.utils.save_and_load)
        tensors[f"{key}.lora_magnitude_vector"] = a.lora_magnitude_vector
    return tensors


def _modules_to_save(model: nn.Module, adapter_name: str):
    for name, module in logical_modules(model):
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            yield name, module


def _tolerated_on_load(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """Keys PEFT writes but cannot load itself, accepted (and loaded) from PEFT's files: with
    bias="all", the trained copy's biases of a modules_to_save wrapper, under
    "<module>.modules_to_save.<bias>" (the same values as "<module>.<bias>")."""
    if config.bias != "all":
        return {}
    return {f"{PREFIX}{name}.modules_to_save.{pname}": p
            for name, module in _modules_to_save(model, adapter_name)
            for pname, p in module.modules_to_save[adapter_name].named_parameters()
            if pname.rsplit(".", 1)[-1] == "bias"}


def _embedding_tensors(model: nn.Module, targeted: bool) -> dict[str, torch.Tensor]:
    """The input and output embedding tables, saved beside the adapter as PEFT does: the base
    tables of targeted (wrapped) embeddings, or whole tables when none is targeted (a resized
    vocabulary)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        if layer is not None:
            layers.append(layer)
    if not layers:
        warnings.warn("save_embedding_layers: the model has no get_input_embeddings(); no embedding saved",
                      stacklevel=3)
    names = {id(m): n for n, m in logical_modules(model)}
    tensors = {}
    for layer in layers:
        name = names.get(id(layer))
        if name is None:
            continue
        if targeted and isinstance(layer, LoraLayer):
            for pname, p in layer.base_layer.named_parameters():
                tensors[f"{PREFIX}{name}.base_layer.{pname}"] = p
        elif not targeted:
            for pname, p in layer.named_parameters():
                tensors[f"{PREFIX}{name}.{pname}"] = p
    return tensors


def base_precision(model: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8": how ``model``'s quantized linear layers are stored (the first found,
    `lorakit.plugins.quantized_base`); None when it has none."""
    for module in model.modules():
        kind = quantized_base(module)
        if kind is not None:
            return kind.precision(module)
    return None


def read_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of an adapter directory's weights ({} when there is none)."""
    try:
        with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a corrupt file
        raise AdapterFormatError(f"{Path(directory) / WEIGHTS_NAME}: not a readable safetensors file ({err})") from None


def save_adapter(directory: str | os.PathLike, config: LoraConfig,
                 tensors: dict[str, torch.Tensor], *, base_precision: str | None = None) -> Path:
    """Write config and weights into ``directory`` atomically (a temporary directory beside it,
    then renames), so a crash never leaves a half-written adapter. ``base_precision`` (a
    quantized base's storage) goes into the weights' metadata."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=directory))
    try:
        # clone: tied tables share storage, which safetensors refuses to write twice
        data = {k: t.detach().to("cpu").clone().contiguous() for k, t in tensors.items()}
        metadata = {"format": "pt"} | ({BASE_PRECISION_KEY: base_precision} if base_precision else {})
        save_file(data, str(tmp / WEIGHTS_NAME), metadata=metadata)
        config.save_pretrained(tmp, inference_mode=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory: its config and its tensors. Never unpickles."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: no such adapter directory")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise AdapterFormatError(
                f"{directory / PICKLE_NAME}: lorakit does not load pickled weights (a pickle can "
                "run code). If you trust the file, convert it once in Python: "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), "
                f"'{weights}', metadata={{'format': 'pt'}})"
            )
        raise AdapterFormatError(f"{directory}: no {WEIGHTS_NAME} (an adapter directory holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config = LoraConfig.from_pretrained(directory)
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a corrupt file
        raise AdapterFormatError(f"{weights}: not a readable safetensors file ({err})") from None
    return config, tensors


# The rank-bearing tensors of the LoRA family's files, by key suffix: each dimension is "r" (the
# layer's rank in the config), "in" / "out" (the base layer's; for an embedding, the vocabulary
# size and the embedding width) or a number.
_RANKED_SUFFIXES = {
    "lora_A.weight": ("r", "in"), "lora_B.weight": ("out", "r"),
    "lora_embedding_A": ("r", "in"), "lora_embedding_B": ("out", "r"),
    "lora_A": ("r", "in"), "lora_B": ("out", "r"), "lora_E": ("r", 1),  # AdaLoRA's
    "lora_magnitude_vector": ("out",),  # DoRA's
}


def _layer_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer an adapter can wrap; None for any other module."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if is_conv1d(base):
        return tuple(base.weight.shape)  # Conv1D stores (in, out)
    return None


def _config_rank(config: LoraConfig, module_name: str) -> int:
    rank_of = getattr(config, "rank_of", None)  # AdaLoRA: init_r or the kept triplets
    return rank_of(module_name) if callable(rank_of) else pattern_value(config.rank_pattern, module_name, config.r)


def check_shapes_before_injection(model: nn.Module, config: LoraConfig, shapes: dict[str, tuple],
                                  source: str | os.PathLike) -> None:
    """Compare the file's tensor shapes (``shapes``: key -> shape, from the safetensors header)
    with what ``config`` would build on ``model``, BEFORE anything is injected or allocated: a
    config whose r (or rank_pattern) disagrees with the file's tensors is an AdapterFormatError,
    a tensor whose layer dimensions are not the model's a CompatibilityError, each naming the
    tensor, the expected and the found shape. Keys of modules the model lacks are left to
    `load_adapter_tensors`, which reports them with every other missing or unexpected key."""
    rank_problems, model_problems = [], []
    modules = dict(logical_modules(model))
    in_file = set()  # the modules the file has tensors for
    for key, shape in sorted(shapes.items()):
        if not key.startswith(PREFIX):
            continue
        rest = key[len(PREFIX):]
        suffix = next((x for x in _RANKED_SUFFIXES if rest.endswith("." + x)), None)
        if suffix is None:
            continue
        module_name = rest[:-len(suffix) - 1]
        in_file.add(module_name)
        dims = _layer_dims(modules[module_name]) if module_name in modules else None
        if dims is None:
            continue
        rank = _config_rank(config, module_name)
        sizes = {"r": rank, "in": dims[0], "out": dims[1]}
        expected = tuple(sizes.get(d, d) for d in _RANKED_SUFFIXES[suffix])
        shape = tuple(shape)
        if shape == expected:
            continue
        line = f"{key}: expected {expected}, found {shape}"
        layer_dims_agree = len(shape) == len(expected) and all(
            got == want for got, want, d in zip(shape, expected, _RANKED_SUFFIXES[suffix]) if d != "r")
        if layer_dims_agree:
            rank_problems.append(f"{line} (rank {rank} in the config)")
        else:
            model_problems.append(line)
    targeted = [name for name, _ in match_targets(model, resolve_targets(model, config))]
    lacking = [name for name in targeted if name not in in_file]
    if lacking:  # injecting would allocate them at the config's rank only to refuse the file after
        raise AdapterFormatError(
            f"{source}: {CONFIG_NAME} targets {len(lacking)} module(s) that {WEIGHTS_NAME} has no tensors for, "
            f"e.g. {', '.join(lacking[:5])}; nothing was loaded. The two files are from different adapters, or "
            "the tensors file is incomplete: save the adapter again")
    if rank_problems:
        raise AdapterFormatError(
            f"{source}: the tensors do not have the rank the adapter config gives (r / rank_pattern in "
            f"{CONFIG_NAME} disagree with {WEIGHTS_NAME}); nothing was loaded:\n  - "
            + "\n  - ".join(rank_problems[:20]) + (f"\n  ... and {len(rank_problems) - 20} more"
                                                    if len(rank_problems) > 20 else ""))
    if model_problems:
        raise CompatibilityError(
            f"{source}: tensor shapes do not match this base model (is the adapter for another "
            f"model?); nothing was loaded:\n  - " + "\n  - ".join(model_problems[:20])
            + (f"\n  ... and {len(model_problems) - 20} more" if len(model_problems) > 20 else ""))


def load_adapter_tensors(model: nn.Module, adapter_name: str, config: LoraConfig,
                         loaded: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy ``loaded`` (file keys) into the adapter's parameters, after checking all of it.

    Raises AdapterFormatError for missing, unexpected, non-float and non-finite tensors and
    CompatibilityError for shape mismatches, each listing every offending key."""
    expected = adapter_tensors(model, adapter_name, config, save_embedding_layers=False)
    optional = {**adapter_tensors(model, adapter_name, config, save_embedding_layers=True),
                **_tolerated_on_load(model, adapter_name, config)}
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(optional))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not part of this adapter on this model): {_listed(unexpected)}")
    bad_dtype = sorted(k for k, t in loaded.items() if not t.is_floating_point())
    if bad_dtype:
        problems.append(f"tensors that are not floating point: "
                        f"{_listed([f'{k} ({loaded[k].dtype})' for k in bad_dtype])}")
    non_finite = sorted(k for k, t in loaded.items()
                        if t.is_floating_point() and not torch.isfinite(t).all())
    if non_finite:
        problems.append(f"tensors with NaN or infinite values: {_listed(non_finite)}")
    if problems:
        raise AdapterFormatError(f"{source}: the adapter file does not fit adapter "
                                 f"{adapter_name!r}:\n  - " + "\n  - ".join(problems))
    mismatched = [f"{k}: file {tuple(t.shape)}, model {tuple(optional[k].shape)}"
                  for k, t in sorted(loaded.items()) if tuple(t.shape) != tuple(optional[k].shape)]
    if mismatched:
        raise CompatibilityError(
            f"{source}: tensor shapes do not match this base model (is the adapter for another "
            f"model, or another rank?):\n  - " + "\n  - ".join(mismatched)
        )
    with torch.no_grad():
        for key, tensor in loaded.items():
            target = optional[key]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def _listed(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")
