"""What a training step minimises, and how the held-out set is judged by the same measure.

    SupervisedObjective   next-token cross-entropy on the label tokens (SFT): the loss summed over
                          the batch's label tokens, a step divided by the tokens of all its batches
    PreferenceObjective   DPO or ORPO on preference pairs (`lorakit.train.preference`): the loss
                          summed over the batch's pairs, a step divided by its pairs

An objective is called as ``objective(peft_model, batch)`` -> (loss sum, units, statistics summed
over the units); ``units(batch)`` says how many units a batch holds before any forward (a step
needs the total to scale each micro-batch's gradient) and ``heldout(...)`` the held-out metrics
that go to metrics.jsonl as ``eval`` records (``eval_loss`` always).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lorakit.data import IGNORE_INDEX
from lorakit.evaluation import heldout_loss, loss_sum
from lorakit.train.config import TRAIN_METHODS, TrainConfig
from lorakit.train.preference import PreferenceObjective, heldout_preferences

__all__ = ["SupervisedObjective", "PreferenceObjective", "objective_for", "heldout_metrics"]


class SupervisedObjective:
    """Next-token cross-entropy on label tokens (`lorakit.evaluation.loss_sum`)."""

    def __call__(self, peft_model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        loss, count = loss_sum(peft_model, batch)
        return loss, count, {}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def objective_for(config: TrainConfig) -> SupervisedObjective | PreferenceObjective:
    if TRAIN_METHODS[config.method].preference:
        losses = config.loss_type if isinstance(config.loss_type, str) else tuple(config.loss_type)
        weights = tuple(config.loss_weights) if config.loss_weights is not None else None
        return PreferenceObjective(config.method, beta=config.beta, loss_type=losses, loss_weights=weights,
                                   label_smoothing=config.label_smoothing, reference_free=config.reference_free)
    return SupervisedObjective()


def heldout_metrics(objective, model, examples: Sequence, collate: Callable, batch_size: int,
                    autocast: Callable) -> dict[str, float]:
    """``{"eval_loss": ...}``, and for preference pairs the rewards, margin and reward accuracy."""
    if isinstance(objective, PreferenceObjective):
        means = heldout_preferences(model, examples, collate, batch_size, autocast, objective)
        return {"eval_loss": means.pop("loss"), **{f"eval_{k}": v for k, v in means.items()}}
    return {"eval_loss": heldout_loss(model, examples, collate, batch_size, autocast)}
