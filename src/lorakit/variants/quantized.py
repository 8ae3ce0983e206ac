"""LoRA on a quantized frozen base (QLoRA, Dettmers et al. 2023): bitsandbytes' 4-bit (NF4, FP4)
and 8-bit linear layers, as transformers loads them with a ``BitsAndBytesConfig``.

Both bitsandbytes layers subclass ``nn.Linear``, so `lorakit.inject` targets them as it targets
any linear layer and `lorakit.layer.LoraLinear` wraps them; this module tells the core how to
read and write their weights (`lorakit.plugins.QuantizedBase`):

    4-bit   weight: Params4bit, packed uint8 (two 4-bit codes a byte) plus a QuantState with one
            absmax per block of 64 (itself quantized to 8 bits with double quantization)
            W = dequantize_4bit(packed, state)                         (out, in), state.dtype
    8-bit   weight: Int8Params, int8 (out, in), one fp32 scale (SCB) per output row
            W = int8 * SCB / 127

Merging dequantizes, adds the update in fp32 and quantizes the sum again, as PEFT does (so a
merged quantized layer rounds differently from the adapter's own forward; `lorakit merge` writes
an unquantized model instead). `prepare_model_for_kbit_training` is PEFT's function of that name.

bitsandbytes is an optional dependency, imported on first use (`import_bitsandbytes`).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
import torch.nn as nn

from lorakit import plugins
from lorakit.errors import ConfigError

__all__ = ["FOUR_BIT", "EIGHT_BIT", "INSTALL_HINT", "import_bitsandbytes", "prepare_model_for_kbit_training"]

INSTALL_HINT = "pip install 'lorakit[qlora]' (bitsandbytes; on CPU it needs an x86-64 processor with AVX2)"

# bitsandbytes logs, through `logging`, on import (an optional CPU kernel it cannot fetch offline)
# and on every 8-bit matmul of fp32 inputs: neither is the user's business
_QUIET = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")


for _name in _QUIET:  # set before bitsandbytes is imported, by lorakit or by transformers
    logging.getLogger(_name).setLevel(logging.ERROR)


def import_bitsandbytes():
    """The ``bitsandbytes`` module; a `ConfigError` naming the install command where it is missing
    or does not load."""
    try:
        return importlib.import_module("bitsandbytes")  # optional and heavy: imported on first use
    except ImportError as err:
        raise ConfigError(f"a 4-bit or 8-bit base needs bitsandbytes, which does not import here ({err}): "
                          f"{INSTALL_HINT}") from err


def _weight_class(module: nn.Module) -> str:
    return type(getattr(module, "weight", None)).__name__


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and _weight_class(module) == "Params4bit"


def _is_8bit(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and _weight_class(module) == "Int8Params"


# --------------------------------------------------------------------------- 4-bit

def _dequantize_4bit(layer: nn.Module) -> torch.Tensor:
    bnb = import_bitsandbytes()
    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()  # (out, in)


def _requantize_4bit(layer: nn.Module, weight: torch.Tensor) -> None:
    bnb = import_bitsandbytes()
    old = layer.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs.update(bnb_quantized=False, requires_grad=False)
    kwargs.pop("quant_state", None)  # a new one comes with the new codes
    layer.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)


def _keep_trainable_layout(layer: nn.Module) -> None:
    """Keep the layer's weight in the layout its gradients flow through. On a CPU with AVX512-BF16,
    bitsandbytes (0.50) repacks a 4-bit weight for its inference kernel at the first forward in
    eval mode without gradients, and keeps it repacked: that kernel has no backward, so a later
    training forward drops the gradient through W x (the adapters of every earlier layer train on
    wrong gradients), and it rounds the block scales to bf16. A model with adapters trains, so its
    4-bit layers, targeted or not, stay in the standard layout (a weight already repacked is
    unpacked, as bitsandbytes does before saving)."""
    bnb = import_bitsandbytes()
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state)
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


FOUR_BIT = plugins.register_quantized_base(plugins.QuantizedBase(
    name="bitsandbytes 4-bit", matches=_is_4bit, precision=lambda layer: layer.weight.quant_type,
    dequantize=_dequantize_4bit, requantize=_requantize_4bit, prepare=_keep_trainable_layout,
))


# --------------------------------------------------------------------------- 8-bit

def _row_scales(layer: nn.Module) -> torch.Tensor:
    # before the layer's first forward the scales are on the weight; after it, on the layer's state
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def _dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    bnb = import_bitsandbytes()
    w = layer.weight
    return bnb.functional.int8_vectorwise_dequant(w.data, _row_scales(layer).to(w.device)).float()  # (out, in)


def _requantize_8bit(layer: nn.Module, weight: torch.Tensor) -> None:
    bnb = import_bitsandbytes()
    old = layer.weight
    layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                     has_fp16_weights=old.has_fp16_weights).to(old.device)
    layer.state.reset_grads()
    layer.state.CB = layer.state.SCB = None  # the layer's next forward takes the new codes and scales


EIGHT_BIT = plugins.register_quantized_base(plugins.QuantizedBase(
    name="bitsandbytes 8-bit", matches=_is_8bit, precision=lambda layer: "int8",
    dequantize=_dequantize_8bit, requantize=_requantize_8bit,
))


# --------------------------------------------------------------------------- preparing a model

def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """PEFT's ``prepare_model_for_kbit_training``, with its behaviour, for a transformers model
    (quantized or not): freeze every parameter; cast the fp16 / bf16 parameters that are not
    4-bit weights (norms, embeddings, the output head) to fp32; on a model loaded in 4 or 8 bits
    with ``use_gradient_checkpointing``, turn on gradient checkpointing (with
    ``gradient_checkpointing_kwargs``) and, unless ``use_reentrant=False`` is asked for, make the
    input embeddings' output require grad so that reentrant checkpointing sees a gradient.
    Returns the model."""
    loaded_in_kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if loaded_in_kbit and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
