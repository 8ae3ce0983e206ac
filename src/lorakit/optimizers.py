"""Optimizers for LoRA training, where PEFT keeps them: ``from lorakit.optimizers import
create_loraplus_optimizer`` runs code written for ``peft.optimizers`` unchanged."""

from lorakit.variants.loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
