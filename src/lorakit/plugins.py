"""The core's plug-in points: each LoRA method and each variant fills one when it is imported.

    methods              peft_type -> what the core asks of a method       (methods/lora.py,
                         ("LORA", "ADALORA"): config class, injection,      methods/adalora/)
                         model class, file keys, what it supports
    adapter variants     Adapter.variant name -> its forward and merge rule   (variants/dora.py)
    base-weight inits    init_lora_weights values that read W and leave a residual
                                                                              (variants/inits.py)
    quantized bases      frozen layers whose weight is stored quantized: how LoRA reads and
                         writes it (bitsandbytes 4-bit and 8-bit: variants/quantized.py)
    model operations     PeftModel methods a variant implements: "add_weighted_adapter"
                         (variants/weighted.py), "convert_to_lora" (variants/inits.py)

A variant is one leaf module under `lorakit.variants` that imports the core and calls a
``register_*`` function below at import; ``lorakit/__init__.py`` imports every variant module,
so importing lorakit registers them all. The core (`layer`, `inject`, `model`) consults this
module and never imports a variant. A LoRA method is a module (or package) under
`lorakit.methods` that calls `register_method`; `lorakit.config`, `lorakit.inject`,
`lorakit.model`, `lorakit.io` and `lorakit.batching` look one up with
`method_for(config.peft_type)` and never name one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from lorakit.errors import ConfigError

if TYPE_CHECKING:  # types only: these modules consult this one
    import torch
    import torch.nn as nn

    from lorakit.config import LoraConfig
    from lorakit.layer import Adapter, LoraLayer
    from lorakit.model import LoraModel

__all__ = ["Method", "register_method", "method_for", "peft_types", "AdapterVariant", "BaseWeightInit", "register_variant", "register_init", "register_operation",
           "variant", "variants", "base_weight_init", "operation", "QuantizedBase", "register_quantized_base",
           "quantized_base"]


@dataclass(frozen=True)
class AdapterVariant:
    """An adapter with its own forward and merge rule on linear layers (DoRA). An `Adapter`
    whose ``variant`` is None is plain LoRA and runs `lorakit.layer`'s own rule."""

    name: str
    """The value of ``Adapter.variant`` for adapters of this variant."""
    wanted: Callable[[LoraConfig], bool]
    """Whether a config asks for this variant (DoRA: ``config.use_dora``)."""
    check_targets: Callable[[list[tuple[str, nn.Module]]], None]
    """Refuses, before anything is wrapped, matched (name, module) pairs it cannot cover."""
    attach: Callable[[LoraLayer, str], None]
    """Makes the layer's freshly initialised adapter of that name one of this variant."""
    forward: Callable[[LoraLayer, Adapter, torch.Tensor, torch.Tensor], torch.Tensor]
    """``forward(layer, adapter, x, result)``: result plus the adapter's output (the reference)."""
    fused_forward: Callable[[LoraLayer, Adapter, torch.Tensor, Any], torch.Tensor | None]
    """``fused_forward(layer, adapter, x, dtype)``: the whole layer output, or None to fall back."""
    merged_weight: Callable[[LoraLayer, str], torch.Tensor]
    """The base weight with the adapter merged in, fp32, in the weight's layout."""
    unmerged_weight: Callable[[LoraLayer, str], torch.Tensor]
    """The inverse of merged_weight."""
    row_scale: Callable[[LoraLayer, Adapter], torch.Tensor] | None = None
    """For mixed-adapter batches (`lorakit.batching`): the (out,) factor c by which a row's
    whole output is scaled, ``c * (W x + s B A x)`` (DoRA: ``m / ||W + s B A||``); None: the
    variant has no mixed-batch form and such batches are refused."""


@dataclass(frozen=True)
class BaseWeightInit:
    """``init_lora_weights`` values that start A and B from the base weight W and replace W by
    the residual ``W - scale * B A`` (PiSSA, OLoRA)."""

    handles: Callable[[Any], bool]
    """Whether an init_lora_weights value is one of these."""
    check_targets: Callable[[nn.Module, LoraConfig], None]
    """Refuses, before any weight changes, the targeted layers the init cannot run on."""
    init_from_base: Callable[[LoraLayer, Adapter, Any], None]
    """``init_from_base(layer, adapter, init)``: sets A, B and the residual W, in place."""
    warn_on_reload: Callable[[Any, str], None]
    """``warn_on_reload(init, event)``: a warning where a saved adapter may not reload exactly."""


@dataclass(frozen=True)
class QuantizedBase:
    """A frozen linear layer whose weight is stored quantized (bitsandbytes' ``Linear4bit`` and
    ``Linear8bitLt``). LoRA wraps it as it wraps ``nn.Linear``, runs the layer's own forward for
    ``W x``, and reads or writes W only through these (merging, and DoRA's norms)."""

    name: str
    """Its name in messages ("bitsandbytes 4-bit")."""
    matches: Callable[[nn.Module], bool]
    """Whether a module is a layer of this kind."""
    precision: Callable[[nn.Module], str]
    """The layer's storage: "nf4", "fp4" or "int8"."""
    dequantize: Callable[[nn.Module], torch.Tensor]
    """The layer's weight as it computes with it: fp32, (out, in)."""
    requantize: Callable[[nn.Module, torch.Tensor], None]
    """``requantize(layer, weight)``: store the fp32 (out, in) ``weight`` in the layer, quantized
    as its weight was (a merge)."""
    prepare: Callable[[nn.Module], None] | None = None
    """What adding an adapter to a model does to each of its layers of this kind, targeted or
    not (None: nothing)."""


_VARIANTS: dict[str, AdapterVariant] = {}
_INITS: list[BaseWeightInit] = []
_QUANTIZED: list[QuantizedBase] = []
_OPERATIONS: dict[str, Callable] = {}


def register_variant(rule: AdapterVariant) -> AdapterVariant:
    _VARIANTS[rule.name] = rule
    return rule


def register_init(init: BaseWeightInit) -> BaseWeightInit:
    if init not in _INITS:
        _INITS.append(init)
    return init


def register_operation(name: str, function: Callable) -> Callable:
    _OPERATIONS[name] = function
    return function


def register_quantized_base(kind: QuantizedBase) -> QuantizedBase:
    if kind not in _QUANTIZED:
        _QUANTIZED.append(kind)
    return kind


def quantized_base(module: nn.Module) -> QuantizedBase | None:
    """The quantized-base kind of ``module``; None for a layer whose weight is a plain tensor."""
    return next((k for k in _QUANTIZED if k.matches(module)), None)


def variant(name: str) -> AdapterVariant:
    """The rule of ``Adapter.variant`` ``name``."""
    if name not in _VARIANTS:
        raise ConfigError(f"adapter variant {name!r} is not registered; known: {sorted(_VARIANTS)}")
    return _VARIANTS[name]


def variants() -> list[AdapterVariant]:
    """Every registered adapter variant, in registration order."""
    return list(_VARIANTS.values())


def base_weight_init(init: Any) -> BaseWeightInit | None:
    """The base-weight init that runs ``init`` (an init_lora_weights value); None for the inits
    that leave W alone (True, False, "gaussian": `lorakit.layer.Adapter` runs those)."""
    return next((i for i in _INITS if i.handles(init)), None)


def operation(name: str) -> Callable:
    """The model operation ``name`` a variant registered."""
    if name not in _OPERATIONS:
        raise ConfigError(f"operation {name!r} is not available: no variant registered it "
                          f"(known: {sorted(_OPERATIONS)})")
    return _OPERATIONS[name]


# --------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    """What the core needs from one LoRA method."""

    peft_type: str
    """The ``peft_type`` of its adapter_config.json ("LORA", "ADALORA")."""
    name: str
    """Its name in messages ("LoRA", "AdaLoRA")."""
    config_class: type[LoraConfig]
    """Reads and writes its adapter_config.json (a `LoraConfig` subclass)."""
    inject: Callable[[nn.Module, LoraConfig, str, bool], LoraConfig]
    """``inject(model, config, adapter_name, autocast_adapter_dtype)``: adds the adapter to every
    targeted module in place; returns the config with concrete target_modules (what is saved)."""
    model_class: type[LoraModel]
    """``PeftModel.base_model``'s class (`LoraModel` or a subclass with the method's hooks)."""
    layer_tensors: Callable[[str, str, nn.Module, nn.Module, LoraConfig], dict[str, torch.Tensor]]
    """``layer_tensors(key, module_name, layer, adapter, config)``: one layer's adapter tensors under
    their file keys (``key`` is the module's key, e.g. ``base_model.model.<module>``), as live
    tensors of the model: saving reads them, loading copies into them."""
    mixed_batches: bool
    """Whether rows of one batch may run through different adapters (`lorakit.batching`)."""
    resume_problem: str | None
    """Why a training run of this method cannot resume from a checkpoint; None when it can."""


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known by its peft_type (called once, by the method's own module)."""
    if method.peft_type in _METHODS and _METHODS[method.peft_type] != method:
        raise ConfigError(f"two LoRA methods register peft_type {method.peft_type!r}; rename one")
    _METHODS[method.peft_type] = method
    return method


def peft_types() -> list[str]:
    """The registered peft_types, sorted."""
    return sorted(_METHODS)


def method_for(peft_type: str | None) -> Method:
    """The method of ``peft_type`` (None reads as "LORA", as PEFT's files without one do)."""
    method = _METHODS.get(peft_type or "LORA")
    if method is None:
        raise ConfigError(f"peft_type is {peft_type!r}; lorakit supports {', '.join(peft_types())} adapters")
    return method
