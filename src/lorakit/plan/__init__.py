"""The planner: what LoRA will train and cost on a model, and what to choose.

- `load_shape(model)`: a model's shape from a directory, config.json, GGUF header or built-in name.
- `estimate(model, config, ...)`: trainable parameters, adapter size, training memory.
"""

from lorakit.plan.estimate import Estimate, estimate
from lorakit.plan.memory import MemoryEstimate
from lorakit.plan.shapes import ModelShape, ModuleShape
from lorakit.plan.sources import load_shape
from lorakit.plan.targets import LoraSpec, TargetedModule

__all__ = [
    "ModelShape", "ModuleShape", "load_shape",
    "LoraSpec", "TargetedModule",
    "Estimate", "MemoryEstimate", "estimate",
]
