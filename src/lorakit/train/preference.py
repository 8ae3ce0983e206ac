"""Preference tuning objectives: DPO (with a reference model for free) and ORPO (with none).

DPO (Rafailov et al., 2023), as TRL's DPOTrainer computes it. With per-answer summed
log-probabilities of the policy (the model with the adapter being trained) and of the reference
(the same model with that adapter disabled, or with the adapter it started from: ``ref``):

    chosen_reward   = beta * (logp(chosen)   - ref_logp(chosen))
    rejected_reward = beta * (logp(rejected) - ref_logp(rejected))
    sigmoid: loss = -log sigmoid(chosen_reward - rejected_reward)
    sft:     loss = the chosen answers' NLL per token (with sigmoid: DPO plus an NLL term, RPO)
    hinge:   loss = relu(1 - (chosen_reward - rejected_reward))
    ipo:     loss = (log-ratio per chosen token - log-ratio per rejected token - 1 / (2 beta))^2
    robust:  loss = ((1 - e) (-log sigmoid(m)) + e log sigmoid(-m)) / (1 - 2e),  m = reward margin, e = label_smoothing

``reference_free``: the reference log-probabilities are 0 (the policy's own log-ratio of the two
answers is the margin). The reference forward runs under ``no_grad`` on the same batch layout
as the policy's (one extra forward, no second copy of the model).

ORPO (Hong et al., 2024), as TRL's ORPOTrainer computes it: the NLL of the prompt and chosen
answer (mean per token) minus ``beta`` times the mean log-sigmoid of the log odds ratio of the
answers' average per-token log-probabilities; its rewards are ``beta`` times those averages.

Each objective returns the loss SUM over the batch's pairs (ORPO: its batch mean times the pairs),
so that the trainer divides by the pairs of a whole step, as it divides SFT losses by tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lorakit.data.preference import PreferenceExample
from lorakit.errors import ConfigError
from lorakit.evaluation.preference import AnswerLogProbs, answer_log_probs
from lorakit.inject import ModulesToSave, logical_modules
from lorakit.layer import LoraLayer
from lorakit.model import PeftModel
from lorakit.train.methods import LOSS_TYPES

__all__ = ["LOSS_TYPES", "REFERENCE_ADAPTER", "PreferenceObjective", "dpo_losses",
           "orpo_loss", "heldout_preferences", "reference_adapter"]

REFERENCE_ADAPTER = "ref"
"""The frozen adapter a run that starts from an existing adapter keeps as its reference (TRL's name)."""


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _pair_losses(policy: AnswerLogProbs, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, *, beta: float,
                 loss_type: str, label_smoothing: float) -> torch.Tensor:
    """One loss type's per-pair losses (N,)."""
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":  # per-token log-ratios (TRL's normalisation, confirmed with the IPO authors)
        per_token = chosen_ratio / policy.tokens[0::2].clamp(min=1) - rejected_ratio / policy.tokens[1::2].clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    if loss_type == "sft":  # the chosen answers' NLL per token over the batch, as TRL's (each pair's share)
        nll = -policy.chosen.sum() / policy.tokens[0::2].sum().clamp(min=1)
        return nll.expand(len(chosen_ratio))
    raise ConfigError(f"loss_type={loss_type!r}: must be one of {', '.join(LOSS_TYPES)}")


def dpo_losses(policy: AnswerLogProbs, reference: AnswerLogProbs | None, *, beta: float,
               loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (N,), chosen rewards (N,), rejected rewards (N,)); ``reference`` None:
    reference-free (its log-probabilities 0). Several loss types are summed with ``loss_weights``
    (1 each by default), as TRL sums them. Rewards are detached."""
    chosen_ratio, rejected_ratio = policy.chosen, policy.rejected
    if reference is not None:
        chosen_ratio, rejected_ratio = chosen_ratio - reference.chosen, rejected_ratio - reference.rejected
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    losses = sum(w * _pair_losses(policy, chosen_ratio, rejected_ratio, beta=beta, loss_type=t,
                                  label_smoothing=label_smoothing) for t, w in zip(types, weights, strict=True))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(policy: AnswerLogProbs, *, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(the batch's ORPO loss, chosen rewards (N,), rejected rewards (N,), {nll, log_odds_ratio})."""
    chosen = policy.chosen / policy.tokens[0::2].clamp(min=1)  # average per-token log-probabilities
    rejected = policy.rejected / policy.tokens[1::2].clamp(min=1)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = policy.nll / max(policy.nll_tokens, 1)
    loss = nll - beta * ratio.mean()
    return loss, beta * chosen.detach(), beta * rejected.detach(), {"nll": nll.detach(), "log_odds_ratio": ratio.mean().detach()}


@contextlib.contextmanager
def reference_adapter(peft_model: PeftModel):
    """The reference model inside the block: the adapter named ``ref`` active where the model has
    one (a run from an existing adapter), else every adapter disabled. Trainability is untouched."""
    if REFERENCE_ADAPTER not in peft_model.peft_config:
        with peft_model.disable_adapter():
            yield
        return
    modules = [m for _, m in logical_modules(peft_model.get_base_model()) if isinstance(m, (LoraLayer, ModulesToSave))]
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    copies = [m for m in modules if isinstance(m, ModulesToSave)]  # modules_to_save: the reference's copy
    active = [list(m.active_adapters) for m in layers], [m.active_adapter for m in copies]
    for m in layers:
        m.active_adapters = [REFERENCE_ADAPTER]
    for m in copies:
        m.active_adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in m.modules_to_save else None
    try:
        yield
    finally:
        for m, names in zip(layers, active[0]):
            m.active_adapters = names
        for m, name in zip(copies, active[1]):
            m.active_adapter = name


@dataclass(frozen=True)
class PreferenceObjective:
    """The loss a preference run's step takes: ``objective(peft_model, batch)`` ->
    (loss summed over the pairs, pairs, statistics summed over the pairs)."""

    method: str
    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    reference_free: bool = False

    def __call__(self, peft_model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        pairs = int(batch["pairs"])
        if self.method == "orpo":
            policy = answer_log_probs(peft_model, batch, nll=True)
            loss, chosen, rejected, extra = orpo_loss(policy, beta=self.beta)
            loss = loss * pairs
            extra = {k: v * pairs for k, v in extra.items()}
        else:
            reference = None
            if not self.reference_free:
                with torch.no_grad(), reference_adapter(peft_model):
                    reference = answer_log_probs(peft_model, batch)
            policy = answer_log_probs(peft_model, batch)
            losses, chosen, rejected = dpo_losses(policy, reference, beta=self.beta, loss_type=self.loss_type,
                                                  loss_weights=self.loss_weights, label_smoothing=self.label_smoothing)
            loss, extra = losses.sum(), {}
        stats = {"rewards_chosen": chosen.sum(), "rewards_rejected": rejected.sum(),
                 "reward_margin": (chosen - rejected).sum(), "reward_accuracy": (chosen > rejected).float().sum(),
                 **extra}
        return loss, pairs, stats

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What a step's loss is averaged over: pairs."""
        return int(batch["pairs"])


@torch.no_grad()
def heldout_preferences(model, examples: Sequence[PreferenceExample], collate: Callable, batch_size: int,
                        autocast: Callable, objective: PreferenceObjective) -> dict[str, float]:
    """The objective's mean loss and statistics per pair over held-out ``examples``: loss,
    rewards of chosen and rejected, margin, and reward accuracy (chosen rewarded above rejected)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    pairs = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collate(examples[start:start + batch_size]).items()}
        with autocast():
            loss, n, stats = objective(model, batch)
        for key, value in {"loss": loss, **stats}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        pairs += n
    model.train(was_training)
    return {key: value / max(pairs, 1) for key, value in totals.items()}


def _device(model) -> torch.device:
    return next(model.parameters()).device
