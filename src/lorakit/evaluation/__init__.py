"""Evaluation: the loss on label tokens, held-out loss, and task scores by greedy generation.

Shared by training (its objective, its eval steps and its before/after scores) and the jobs that
judge adapters (``lorakit eval``, ``lorakit compare``). It uses `data`, `models`, `generation`
and the core, and never the jobs (train, infer, plan) above it.
"""

from lorakit.evaluation.loss import HEAD_ON_LABELS_ONLY, heldout_loss, loss_sum, model_inputs
from lorakit.evaluation.scorers import SCORERS, scorer_for
from lorakit.evaluation.scoring import ScoreResult, evaluate_adapter, line_breaks_for, score_examples, split_prompt

__all__ = ["loss_sum", "model_inputs", "heldout_loss", "HEAD_ON_LABELS_ONLY", "ScoreResult", "score_examples",
           "split_prompt", "SCORERS", "scorer_for", "evaluate_adapter", "line_breaks_for"]
