"""The adapter of a training run as the command line and config.yaml give it: flat settings (a
preset, r, lora_alpha, ...) over a preset, over a run's saved ``lora`` mapping, or over the adapter
a run starts from (``init_adapter``); `lorakit.train.config.TrainConfig.from_settings` calls these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from lorakit.checks import shown
from lorakit.config import PRESETS, LoraConfig, preset
from lorakit.errors import ConfigError

__all__ = ["AdapterSettings", "adapter_from", "starting_adapter", "init_value"]


@dataclass
class AdapterSettings:
    """The adapter as the command line and config.yaml give it: a preset and the fields that
    override it. `lora_config` turns them into the `LoraConfig` (which validates them)."""

    preset: str = "balanced"
    """conservative, balanced or max_capacity; the fields below override it."""
    r: Optional[int] = None
    """The LoRA rank; unset: the preset's (balanced: 16)."""
    lora_alpha: Optional[float] = None
    """Defaults to r when r is given, else the preset's."""
    lora_dropout: Optional[float] = None
    """Dropout on the adapter's input; unset: the preset's (balanced: 0)."""
    target_modules: Optional[Union[list[str], str]] = None
    """Module names (or all-linear) to adapt; unset: the preset's (balanced: the seven projections)."""
    use_rslora: bool = False
    """rsLoRA: scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r (stable at high ranks)."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output feature times the direction of W + scale * B A."""
    init_lora_weights: Union[bool, str] = True
    """How the adapter starts: true (B zero), false, gaussian, pissa, pissa_niter_N (fast SVD) or olora."""

    def lora_config(self) -> LoraConfig:
        """The causal-LM adapter: the preset, with every setting given here overriding it."""
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ConfigError(f"preset={shown(self.preset)}: must be one of {', '.join(PRESETS)}")
        overrides: dict[str, Any] = {"task_type": "CAUSAL_LM", "use_rslora": self.use_rslora,
                                     "use_dora": self.use_dora, "init_lora_weights": init_value(self.init_lora_weights)}
        for name in ("r", "lora_alpha", "lora_dropout", "target_modules"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        if self.r is not None and self.lora_alpha is None:
            overrides["lora_alpha"] = self.r  # alpha = rank unless said otherwise
        return preset(self.preset, **overrides)


def adapter_from(lora: LoraConfig | dict | None, flat: dict[str, Any]) -> LoraConfig:
    """The adapter from a base (a LoraConfig, a config.yaml mapping, or None: the preset) and the
    flat settings over it; ``r`` without ``lora_alpha`` sets alpha = r."""
    if lora is None:
        return AdapterSettings(**flat).lora_config()
    if isinstance(lora, dict):
        lora = LoraConfig.from_dict(lora)
    if not isinstance(lora, LoraConfig):
        raise ConfigError(f"lora={shown(lora)}: must be a mapping of LoraConfig fields (as a run's "
                          "config.yaml holds it)")
    if "preset" in flat:
        raise ConfigError("preset: give a preset or a lora mapping, not both")
    overrides = {k: init_value(v) if k == "init_lora_weights" else v for k, v in flat.items()}
    if "r" in overrides and "lora_alpha" not in overrides:
        overrides["lora_alpha"] = overrides["r"]  # alpha = rank unless said otherwise
    return dataclasses.replace(lora, **overrides) if overrides else lora


def starting_adapter(directory: str) -> LoraConfig:
    """The LoraConfig of the adapter a run starts from (``init_adapter``)."""
    path = Path(directory)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"init_adapter={directory}: no adapter_config.json there; give an adapter directory, "
                          f"such as runs/<run>/adapter")
    config = LoraConfig.from_pretrained(path)
    if config.peft_type != "LORA":
        raise ConfigError(f"init_adapter={directory}: a {config.peft_type} adapter; a run starts from a LoRA adapter")
    return dataclasses.replace(config, inference_mode=False)


def init_value(value: Any) -> Any:
    """YAML and the command line give "true" / "false" as text; the adapter wants a bool."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value
