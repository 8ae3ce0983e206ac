"""LoRA methods by ``peft_type``: what the core asks of each, registered by the method itself.

    lora.py        LORA: LoraConfig, `LoraLayer` adapters, LoraModel
    adalora/       ADALORA: AdaLoraConfig, SVD-form layers, AdaLoraModel (rank allocation)

A method module builds one `Method` and calls `register` when it is imported; ``lorakit``'s
``__init__`` imports every method module, so importing lorakit registers them all.
`lorakit.config`, `lorakit.inject`, `lorakit.model`, `lorakit.io` and `lorakit.kernels.batching` look
a method up with `method_for(config.peft_type)` and never name one. A new method is one module
(or package) here plus its import in ``lorakit/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lorakit.errors import ConfigError

if TYPE_CHECKING:  # types only: these modules consult this registry
    import torch
    import torch.nn as nn

    from lorakit.config import LoraConfig
    from lorakit.model import LoraModel

__all__ = ["Method", "register", "method_for", "peft_types"]


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
    """Whether rows of one batch may run through different adapters (`lorakit.kernels.batching`)."""
    resume_problem: str | None
    """Why a training run of this method cannot resume from a checkpoint; None when it can."""


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
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
