"""LORA, the plain method: `LoraConfig`, `LoraLayer` adapters (`lorakit.inject.inject_lora`),
`LoraModel`, and PEFT's ``lora_A.weight`` / ``lora_B.weight`` keys (`lorakit.io.lora_layer_tensors`).

Registered here, at import (``lorakit/__init__.py`` imports this module), like every method.
"""

from __future__ import annotations

from lorakit.config import LoraConfig
from lorakit.inject import inject_lora
from lorakit.io import lora_layer_tensors
from lorakit.plugins import Method, register_method
from lorakit.model import LoraModel

__all__ = ["LORA"]

LORA = register_method(Method(
    peft_type=LoraConfig.PEFT_TYPE, name="LoRA", config_class=LoraConfig, inject=inject_lora, model_class=LoraModel,
    layer_tensors=lora_layer_tensors, mixed_batches=True, resume_problem=None,
))
