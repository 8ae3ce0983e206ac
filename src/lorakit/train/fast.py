"""How the trainer sets a model up for speed (the trainer and bench/ both call it).

The settings themselves (`speed_up`: lorakit's attention and fused RMSNorm for Llama-family
models, gradient checkpointing, torch.compile) live in `lorakit.models.speedup`, which the public
`lorakit.speedup` applies too; here is what only the trainer adds: AdamW with the fused
(single-kernel) update where PyTorch has one for the device.

The fused LoRA layers (`lorakit.kernels.fused`) and the chunked loss head (`lorakit.kernels.loss`) need no
switch: they are the default path of every lorakit model.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError
from lorakit.models.speedup import ATTENTION_CHOICES, speed_up
from lorakit.variants.loraplus import loraplus_param_groups

__all__ = ["ATTENTION_CHOICES", "make_optimizer", "speed_up"]


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, *,
                   model: torch.nn.Module | None = None, loraplus_ratio: float | None = None) -> torch.optim.AdamW:
    """AdamW over ``params``; the fused implementation when every parameter is a floating tensor on
    CPU or CUDA (the same update, one kernel instead of about ten small ones per parameter).

    With ``loraplus_ratio`` (and the ``model`` that holds ``params``): LoRA+'s parameter groups
    (`lorakit.variants.loraplus`), B at ``lr * loraplus_ratio``, with ``weight_decay`` as LoRA+'s
    weight decay. Each group records ``lr_scale`` = its lr / ``lr``, so that a schedule that sets
    ``group["lr"] = lr_at(step) * group["lr_scale"]`` keeps the groups' ratios."""
    groups: list[dict] = [{"params": list(params), "lr": lr}]
    if loraplus_ratio is not None:
        if model is None:
            raise ConfigError("make_optimizer: LoRA+ (loraplus_ratio) needs the model, to tell A from B")
        groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_ratio,
                                       loraplus_weight_decay=weight_decay)
        wanted = {id(p) for p in params}
        if {id(p) for g in groups for p in g["params"]} != wanted:
            raise ConfigError("make_optimizer: params must be the model's trainable parameters for LoRA+")
    for g in groups:
        g["lr_scale"] = g["lr"] / lr
    flat = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in flat)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
