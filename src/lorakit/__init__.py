"""lorakit: LoRA fine-tuning for PyTorch, a drop-in for Hugging Face PEFT's LoRA.

    from lorakit import LoraConfig, get_peft_model, PeftModel

runs code written for ``peft`` unchanged, and the adapter directories it writes load in PEFT.
"""

from lorakit.config import PRESETS, LoraConfig, TaskType, preset
from lorakit.errors import (
    AdapterFormatError, CheckpointError, CompatibilityError, ConfigError, DataError,
    LorakitError, ModelLoadError, TrainingError, TrainingInterrupted,
)
from lorakit.model import LoraModel, PeftModel, get_peft_model
from lorakit.optimizers import create_loraplus_optimizer
from lorakit.variants.adalora import AdaLoraConfig

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "AdaLoraConfig", "TaskType", "PRESETS", "preset", "create_loraplus_optimizer",
    "get_peft_model", "PeftModel", "LoraModel",
    "LorakitError", "ConfigError", "AdapterFormatError", "CompatibilityError", "CheckpointError",
    "DataError", "ModelLoadError", "TrainingError", "TrainingInterrupted",
    "__version__",
]
