"""LoRA+: train B at a higher learning rate than A (Hayou, Ghosh and Yu 2024).

LoRA+ (https://arxiv.org/abs/2402.12354) shows that with one learning rate for both factors of
``scale * B A``, feature learning is inefficient at large width: A and B want different step
sizes. It sets

    lr_A = lr,    lr_B = lr * loraplus_lr_ratio        (ratio ~ 16 in the paper)

and nothing else changes: the adapter, its forward and its files are plain LoRA. LoRA+ is only
an optimizer's parameter groups, built here exactly as PEFT 0.21's
`peft.optimizers.create_loraplus_optimizer` builds them:

    group            parameters                                          lr                     weight_decay
    A                lora_A and every other trainable matrix             lr                     loraplus_weight_decay
    embedding        lora_A / lora_B of adapters on embedding layers     loraplus_lr_embedding  loraplus_weight_decay
    B                lora_B and 1-d parameters (biases, DoRA magnitudes) lr * ratio             loraplus_weight_decay
    B, no decay      those of B that are biases or LayerNorm weights     lr * ratio             0.0

(transformers' rule for "no decay": a name containing "bias", or a parameter of an
``nn.LayerNorm``.) The four groups are always present, in this order, even when empty, so that an
optimizer state saved by one run loads into another. ``loraplus_weight_decay`` (default 0.0) and
``loraplus_lr_embedding`` (default 1e-6) are taken out of ``**kwargs``; the rest go to the
optimizer.
"""

from __future__ import annotations

import math

import torch.nn as nn
from torch.optim import Optimizer

from lorakit.errors import ConfigError
from lorakit.layer import LoraLayer

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups", "LORAPLUS_GROUPS"]

LORAPLUS_GROUPS = ("A", "embedding", "B", "B_no_decay")
"""The names of the parameter groups, in the optimizer's order (PEFT's order)."""

_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _embedding_adapter_ids(model: nn.Module) -> set[int]:
    """ids of the A and B of every adapter on an embedding layer (its lookup-table factors)."""
    ids = set()
    for module in model.modules():
        if isinstance(module, LoraLayer) and module.is_embedding:
            for adapter in module.adapters.values():
                ids.update((id(adapter.lora_A), id(adapter.lora_B)))
    return ids


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters transformers' Trainer exempts from weight decay: biases and LayerNorm weights."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for module_name, module in model.named_modules():
        if module_name and isinstance(module, nn.LayerNorm):
            names.update(f"{module_name}.{n}" for n, _ in module.named_parameters())
    return names


def loraplus_group_of(model: nn.Module) -> dict[str, str]:
    """Trainable parameter name -> its LoRA+ group (one of `LORAPLUS_GROUPS`)."""
    embedding = _embedding_adapter_ids(model)
    no_decay = _no_decay_names(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups[name] = "embedding"
        elif "lora_B" in name or param.ndim == 1:
            groups[name] = "B_no_decay" if name in no_decay else "B"
        else:
            groups[name] = "A"
    return groups


def _check_number(name: str, value, *, positive: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0) or (not positive and value < 0):
        need = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"{name}={value!r}: must be {need}"
                          + (", e.g. loraplus_lr_ratio=16" if name == "loraplus_lr_ratio" else ""))


def loraplus_param_groups(model: nn.Module, *, lr: float, loraplus_lr_ratio: float,
                          loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6) -> list[dict]:
    """LoRA+'s four parameter groups (see the module docstring), each a dict with ``params``,
    ``lr``, ``weight_decay`` and ``name``; for any ``torch.optim`` optimizer."""
    _check_number("lr", lr)
    _check_number("loraplus_lr_ratio", loraplus_lr_ratio)
    _check_number("loraplus_lr_embedding", loraplus_lr_embedding)
    _check_number("loraplus_weight_decay", loraplus_weight_decay, positive=False)
    by_name = dict(model.named_parameters())
    members: dict[str, list] = {g: [] for g in LORAPLUS_GROUPS}
    for name, group in loraplus_group_of(model).items():
        members[group].append(by_name[name])
    lr_b = lr * loraplus_lr_ratio  # eta_B = ratio * eta_A
    settings = {"A": (lr, loraplus_weight_decay), "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
                "B": (lr_b, loraplus_weight_decay), "B_no_decay": (lr_b, 0.0)}
    return [{"params": members[g], "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g in LORAPLUS_GROUPS]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s groups.

    PEFT's `create_loraplus_optimizer`, argument for argument: ``lr`` is A's learning rate,
    B's is ``lr * loraplus_lr_ratio`` (the paper suggests 16, with ``lr`` about half of plain
    LoRA's). Optional ``loraplus_weight_decay`` (default 0.0) and ``loraplus_lr_embedding``
    (default 1e-6) are taken out of ``kwargs``; the rest (``betas``, ``eps``, ``fused``, ...)
    go to the optimizer. LoRA+: https://arxiv.org/abs/2402.12354
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                   loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr_embedding)
    for g in groups:
        del g["name"]  # PEFT's groups carry params, lr and weight_decay only
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        # bitsandbytes' 8-bit optimizers must keep embedding tables in 32 bits (as PEFT does);
        # imported only here, where the caller already passed one of its classes.
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
