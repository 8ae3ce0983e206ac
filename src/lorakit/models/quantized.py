"""Quantized bases: a model's linear layers stored in 4 or 8 bits by bitsandbytes (QLoRA).

``--quantize`` names one of `lorakit.checks.QUANTIZATIONS`, each one ``BitsAndBytesConfig``:

    nf4    4-bit NormalFloat, double quantization (the QLoRA paper's recipe): ~0.52 bytes a weight
    fp4    4-bit float, double quantization
    int8   LLM.int8(): int8 weights with one scale per output row, ~1 byte a weight

transformers quantizes every linear layer but the output head when it loads the model
(`load_model`, ``quantize=``), so the model is the same one a PEFT user gets from
``from_pretrained(..., quantization_config=...)``. LoRA wraps those layers (`lorakit.variants.quantized`
tells the core how); the adapter stays in full precision. A saved adapter records its base's
quantization (`lorakit.io`), which `base_quantization` reads back, so that `lorakit merge` and
`lorakit inspect` know what the adapter was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit import io, plugins
from lorakit.checks import QUANTIZATIONS
from lorakit.errors import ConfigError
from lorakit.variants.quantized import INSTALL_HINT, import_bitsandbytes

__all__ = ["QUANTIZATIONS", "bnb_config", "check_quantized", "release_file", "base_quantization", "dequantize_model",
           "INSTALL_HINT"]


def bnb_config(quantize: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of a ``--quantize`` value (see the module docstring);
    ``compute_dtype``: the dtype 4-bit layers dequantize to and multiply in."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize={quantize!r}: must be one of {', '.join(QUANTIZATIONS)}")
    import_bitsandbytes()  # a clear error, naming the install command, before transformers' own
    from transformers import BitsAndBytesConfig  # the models layer: transformers enters here

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def check_quantized(model: nn.Module, quantize: str, where: str | Path) -> None:
    """Raise `ConfigError` when loading ``where`` with ``--quantize`` left no layer quantized (a
    model with no linear layers but its output head, which stays unquantized)."""
    if io.base_precision(model) is None:
        raise ConfigError(f"--quantize {quantize}: {where} has no linear layers that bitsandbytes quantizes "
                          "(the output head stays in full precision); train it without --quantize")


def release_file(model: nn.Module) -> None:
    """Copy the model's unquantized tensors out of the weights file they were read from. A tensor
    read straight from a safetensors file is a view of the file's memory mapping, which then stays
    mapped whole: every page of the original weights that quantizing read stays resident and
    counted (on a Llama-3.2-1B shape, 1.9 GB of file pages beside 1 GB of tensors). Tied tensors
    stay tied (one parameter)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():  # 4-bit and 8-bit weights are uint8 / int8, made by quantizing
                p.data = p.data.clone()


def base_quantization(adapter_dir: str | Path) -> str | None:
    """The quantization of the base an adapter was trained on ("nf4", "fp4", "int8"), as its
    adapter_model.safetensors records it; None for an unquantized base or a file that does not say."""
    return io.read_metadata(Path(adapter_dir)).get(io.BASE_PRECISION_KEY)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every bitsandbytes linear layer (also inside LoRA layers) by an
    ``nn.Linear`` holding its dequantized weight in fp32: the weights the quantized model computes
    with, so that a merge into them reproduces the quantized model's outputs. Returns the model."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            kind = plugins.quantized_base(child)
            if kind is None:
                continue
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                               dtype=torch.float32, device=child.weight.device)
            with torch.no_grad():
                linear.weight.copy_(kind.dequantize(child))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.float())
            linear.weight.requires_grad_(False)
            setattr(module, child_name, linear)
            replaced.append(f"{name}.{child_name}" if name else child_name)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # the transformers model
    quantizer = getattr(lm, "hf_quantizer", None)
    if replaced and quantizer is not None:  # a plain model now: cast, saved and loaded as one
        quantizer.remove_quantization_config(lm)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(lm):
            delattr(lm, attr)
    return model
