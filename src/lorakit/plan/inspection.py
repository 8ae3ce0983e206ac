"""`inspect_adapter`: what an adapter directory holds and how much each layer learned.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout: tensors
``base_model.model.<module>.lora_A.weight`` (r x in) and ``.lora_B.weight`` (out x r); embeddings
``lora_embedding_A`` (r x num) / ``lora_embedding_B`` (dim x r)) with safetensors, never a pickle.

For every module the learned update is ``dW = scale * B @ A``; its Frobenius norm is computed
without forming the (out x in) matrix:

    ||B A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T))      (two r x r matrices)

A layer's norm is the root of the sum of its modules' squared norms. An all-zero B is an
untrained module (B starts at zero; an embedding's A does), and any NaN or Inf is reported.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lorakit.errors import AdapterFormatError
from lorakit.inject import pattern_value
from lorakit.io import BASE_PRECISION_KEY

__all__ = ["ModuleUpdate", "Inspection", "inspect_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\."
                  r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                  r"lora_magnitude_vector|base_layer\.weight|base_layer\.bias)$")
# An embedding's A is (r x num) and B (dim x r): the same pair as a Linear's, transposed update.
_PAIR = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}


@dataclass(frozen=True)
class ModuleUpdate:
    """One adapted module: its rank, scale, size and the norm of its learned update."""

    name: str  # the module path in the base model ("model.layers.3.self_attn.q_proj")
    layer: int | None  # the block index, if the path has one
    r: int
    lora_alpha: float
    scale: float
    in_features: int
    out_features: int
    params: int
    update_norm: float  # ||scale * B @ A||_F (nan if a tensor is not finite)
    zero_update: bool  # B (or, for an embedding, A) is all zeros: the module never trained


@dataclass(frozen=True)
class Inspection:
    """An adapter directory, summarised; sizes in bytes."""

    directory: str
    config: dict[str, Any]
    base_model: str | None
    modules: tuple[ModuleUpdate, ...]
    params: int  # every tensor in the file
    file_bytes: int
    dtypes: tuple[str, ...]
    other_tensors: tuple[str, ...]  # DoRA magnitudes, saved embedding tables, biases
    warnings: tuple[str, ...]
    base_precision: str | None = None
    """The storage of the base it was trained on, as the file records it ("nf4", "fp4", "int8":
    a quantized base, `lorakit.io.BASE_PRECISION_KEY`); None: a full-precision base, or not recorded."""

    @property
    def layer_norms(self) -> dict[int, float]:
        """Block index -> norm of all its modules' updates together."""
        sums: dict[int, float] = {}
        for m in self.modules:
            if m.layer is not None:
                sums[m.layer] = sums.get(m.layer, 0.0) + m.update_norm ** 2
        return {layer: math.sqrt(total) for layer, total in sorted(sums.items())}

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "base_model": self.base_model, "config": self.config,
                "params": self.params, "file_bytes": self.file_bytes, "dtypes": list(self.dtypes),
                "modules": [asdict(m) for m in self.modules],
                "layer_norms": {str(k): v for k, v in self.layer_norms.items()},
                "other_tensors": list(self.other_tensors), "warnings": list(self.warnings),
                "base_precision": self.base_precision}


def inspect_adapter(directory: str | os.PathLike) -> Inspection:
    """Read an adapter directory (PEFT layout) and measure what it learned, module by module."""
    directory = Path(directory)
    config = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterFormatError(
                f"{directory}: holds adapter_model.bin, a pickle, which lorakit never loads; "
                "convert it once, on purpose, where you trust the file: load it with PEFT and "
                "save_pretrained(dir) again (safe_serialization is the default)")
        raise AdapterFormatError(f"{directory}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")

    warnings: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other, unexpected, not_finite, dtypes, params = [], [], [], set(), 0
    try:
        with safe_open(str(weights), framework="pt") as f:
            base_precision = (f.metadata() or {}).get(BASE_PRECISION_KEY)
            for key in f.keys():
                tensor = f.get_tensor(key)
                params += tensor.numel()
                dtypes.add(str(tensor.dtype).removeprefix("torch."))
                if not torch.isfinite(tensor).all():
                    not_finite.append(key)
                match = _KEY.match(key)
                if match is None:
                    unexpected.append(key)
                elif match["part"] in _PAIR:
                    parts.setdefault(match["module"], {})[_PAIR[match["part"]]] = tensor
                else:
                    other.append(key)
    except (SafetensorError, OSError) as err:
        raise AdapterFormatError(f"{weights}: not a readable safetensors file ({err}); "
                                 "re-save the adapter") from err

    modules = [_module_update(name, ab, config, weights) for name, ab in parts.items()]
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.name))
    if not modules:
        raise AdapterFormatError(f"{weights}: no LoRA tensors (lora_A / lora_B) in the file")
    for key, expected in _rank_mismatches(modules, config):
        warnings.append(f"{key}: {expected}")
    zero = [m.name for m in modules if m.zero_update]
    if len(zero) == len(modules):
        warnings.append("untrained adapter: every lora_B is all zeros, so it changes nothing "
                        "(B starts at zero; was it saved before training?)")
    elif zero:
        warnings.append(f"{len(zero)} of {len(modules)} modules have a zero update B·A "
                        f"(never trained): {', '.join(zero[:5])}{' ...' if len(zero) > 5 else ''}")
    if not_finite:
        warnings.append(f"non-finite values (NaN or Inf) in {len(not_finite)} tensors: "
                        f"{', '.join(not_finite[:5])}{' ...' if len(not_finite) > 5 else ''}; "
                        "the adapter is unusable: retrain with a lower learning rate")
    if unexpected:
        warnings.append(f"{len(unexpected)} tensors are not LoRA tensors: "
                        f"{', '.join(unexpected[:5])}")
    return Inspection(
        directory=str(directory), config=config,
        base_model=config.get("base_model_name_or_path") or None, modules=tuple(modules),
        params=params, file_bytes=weights.stat().st_size, dtypes=tuple(sorted(dtypes)),
        other_tensors=tuple(other), warnings=tuple(warnings), base_precision=base_precision)


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory; pass an adapter directory "
                                 f"(with {CONFIG_FILE} and {WEIGHTS_FILE})")
    path = directory / CONFIG_FILE
    if not path.is_file():
        inner = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_FILE}"))
        hint = (f"it holds adapters in sub-folders: {', '.join(inner)}; inspect one of them"
                if inner else "is this an adapter directory? (a run directory keeps it in adapter/)")
        raise AdapterFormatError(f"{directory}: no {CONFIG_FILE}; {hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterFormatError(f"{path}: peft_type {kind!r}; lorakit inspects LoRA adapters only")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise AdapterFormatError(f"{path}: field {key!r} is missing or not a number")
    return config


def _module_update(name: str, ab: dict[str, torch.Tensor], config: dict, weights: Path) -> ModuleUpdate:
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise AdapterFormatError(f"{weights}: module {name} has no {missing}; the file is "
                                 "incomplete: re-save the adapter")
    a, b = ab["A"].double(), ab["B"].double()  # (r, in), (out, r)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterFormatError(f"{weights}: module {name}: lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)} do not make a rank-r pair (r x in, out x r)")
    r = a.shape[0]
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    gram = (b.T @ b) * (a @ a.T)  # (r, r): sums to ||B A||_F^2
    norm = abs(scale) * math.sqrt(max(gram.sum().item(), 0.0))
    layer = re.search(r"\.(\d+)\.", name)
    return ModuleUpdate(name=name, layer=int(layer[1]) if layer else None, r=r,
                        lora_alpha=alpha, scale=scale, in_features=a.shape[1],
                        out_features=b.shape[0], params=a.numel() + b.numel(),
                        update_norm=norm,
                        zero_update=bool((a == 0).all() or (b == 0).all()))


def _rank_mismatches(modules: list[ModuleUpdate], config: dict):
    for m in modules:
        expected = pattern_value(config.get("rank_pattern") or {}, m.name, config["r"])
        if expected != m.r:
            yield m.name, f"the config says r={expected}, the tensors have rank {m.r}"
