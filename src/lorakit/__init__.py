"""lorakit: LoRA fine-tuning for PyTorch, a drop-in for Hugging Face PEFT's LoRA.

    from lorakit import LoraConfig, get_peft_model, PeftModel

runs code written for ``peft`` unchanged, and the adapter directories it writes load in PEFT.
``lorakit.speedup(model)`` (`lorakit.models.speedup`) makes such a model train fast in any training loop.
"""

import importlib

from lorakit.config import PRESETS, LoraConfig, TaskType, preset
from lorakit.errors import (
    AdapterFormatError, CheckpointError, CompatibilityError, ConfigError, DataError, DiskFullError,
    LorakitError, ModelLoadError, TrainingError, TrainingInterrupted,
)
from lorakit.model import LoraModel, PeftModel, get_peft_model
from lorakit.optimizers import create_loraplus_optimizer

# The plug-ins register themselves when imported: the methods by peft_type (lorakit.methods),
# the variants in lorakit.plugins. Importing lorakit (or any of its modules) imports them all.
from lorakit.methods import lora  # noqa: F401  (LORA)
from lorakit.methods.adalora import AdaLoraConfig  # ADALORA
from lorakit.variants import dora, inits, weighted  # noqa: F401  (DoRA; PiSSA, OLoRA; add_weighted_adapter)
from lorakit.variants.quantized import prepare_model_for_kbit_training  # bitsandbytes 4-/8-bit bases

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "AdaLoraConfig", "TaskType", "PRESETS", "preset", "create_loraplus_optimizer",
    "get_peft_model", "PeftModel", "LoraModel", "speedup", "prepare_model_for_kbit_training",
    "LorakitError", "ConfigError", "AdapterFormatError", "CompatibilityError", "CheckpointError",
    "DataError", "DiskFullError", "ModelLoadError", "TrainingError", "TrainingInterrupted",
    "__version__",
]


def __getattr__(name: str):
    """``lorakit.speedup``, imported on first use: it belongs to the models layer (`lorakit.models.speedup`),
    which ``import lorakit`` (the core) does not load."""
    if name == "speedup":
        return importlib.import_module("lorakit.models.speedup").speedup
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
