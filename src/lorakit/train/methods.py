"""The training methods `lorakit train` offers (``TrainConfig.method``): how each builds its
adapter config from the run's LoRA settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from lorakit.config import LoraConfig
from lorakit.methods.adalora import AdaLoraConfig

if TYPE_CHECKING:
    from lorakit.train.config import TrainConfig

__all__ = ["TrainMethod", "TRAIN_METHODS", "LOSS_TYPES", "loss_types", "variant_summary"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sft")
"""DPO's losses, by TRL's names: sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO, with label_smoothing),
and sft (the NLL of the chosen answers; with sigmoid: RPO). Several are summed, with loss_weights."""


def _adalora(lora: LoraConfig, total_steps: int) -> LoraConfig:
    """AdaLoRA over the LoRA settings: target_r = r, init_r = ceil(1.5 r), total_step = the run's
    optimizer steps, tinit = 10% of them, tfinal = 20%, deltaT = max(1, steps // 100)."""
    return AdaLoraConfig(
        task_type=lora.task_type, base_model_name_or_path=lora.base_model_name_or_path,
        target_modules=lora.target_modules, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, init_lora_weights=lora.init_lora_weights,
        target_r=lora.r, init_r=math.ceil(1.5 * lora.r), total_step=total_steps,
        tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=max(1, total_steps // 100),
    )


@dataclass(frozen=True)
class TrainMethod:
    """How the trainer builds one method's adapter from the LoRA settings."""

    peft_type: str
    """Its `lorakit.methods` entry (which also says whether a run can resume)."""
    adapter: Callable[[LoraConfig, int], LoraConfig]
    """``adapter(lora, total_steps)``: the run's adapter config."""
    label: Optional[str]
    """Its name in the run's variant summary; None for plain LoRA."""
    loraplus: bool
    """Whether LoRA+ (lora_B at a higher learning rate) applies."""
    final_rank: Callable[[LoraConfig], int] = lambda lora: lora.r
    """The rank the trained adapter ends at, for the run's summary (AdaLoRA: its target_r)."""
    preference: bool = False
    """Trains on preference pairs (prompt, chosen, rejected) instead of supervised examples."""


TRAIN_METHODS: dict[str, TrainMethod] = {
    "lora": TrainMethod("LORA", lambda lora, total_steps: lora, label=None, loraplus=True),
    "adalora": TrainMethod("ADALORA", _adalora, label="AdaLoRA", loraplus=False,
                           final_rank=lambda lora: lora.target_r),
    "dpo": TrainMethod("LORA", lambda lora, total_steps: lora, label="DPO", loraplus=True, preference=True),
    "orpo": TrainMethod("LORA", lambda lora, total_steps: lora, label="ORPO", loraplus=True, preference=True),
}
"""``TrainConfig.method`` -> how the trainer builds its adapter."""


def loss_types(value: object) -> list[str] | None:
    """``loss_type`` as a list of distinct known losses, or None when it is not one."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in LOSS_TYPES for n in names) \
            or len(set(names)) < len(names):
        return None
    return list(names)


def variant_summary(config: TrainConfig) -> str:
    """The LoRA variant a run trains, in words: "LoRA", or e.g. "DoRA, rsLoRA, init pissa, LoRA+ ratio 16"."""
    lora, label = config.lora, TRAIN_METHODS[config.method].label
    if config.method == "dpo":  # e.g. "DPO (sigmoid + sft, beta 0.1)"
        losses = " + ".join(loss_types(config.loss_type) or [str(config.loss_type)])
        label = f"DPO ({losses}{', reference-free' if config.reference_free else ''}, beta {config.beta:g})"
    elif config.method == "orpo":
        label = f"ORPO (beta {config.beta:g})"
    parts = ([label] if label else []) + (["DoRA"] if lora.use_dora else []) + (["rsLoRA"] if lora.use_rslora else [])
    if lora.init_lora_weights is not True:
        parts.append(f"init {str(lora.init_lora_weights).lower()}")
    if config.loraplus_ratio is not None:
        parts.append(f"LoRA+ ratio {config.loraplus_ratio:g}")
    return ", ".join(parts) or "LoRA"
