"""The task score: greedy answers to held-out prompts, matched against the references.

Each example's prompt is its tokens before the first answer token (the first label), and its
reference the answer's text; the model answers every prompt greedily through the one decode
loop (`lorakit.generation.generate_texts`), and a scorer (`lorakit.evaluation.scorers`) counts
the matches. `evaluate_adapter` does this for an adapter directory, as ``lorakit eval``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from lorakit.data.encode import IGNORE_INDEX, Example
from lorakit.data.load import load_data
from lorakit.evaluation.scorers import SCORERS, scorer_for
from lorakit.generation.texts import generate_texts, line_break_ids
from lorakit.models.adapters import load_adapted

__all__ = ["ScoreResult", "score_examples", "split_prompt", "evaluate_adapter", "ONE_LINE_SCORERS", "line_breaks_for"]


def split_prompt(example: Example, tokenizer) -> tuple[list[int], str]:
    """The tokens before the first answer, and the answer's text (without its end token)."""
    labels = example.labels
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    answer = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=True)
    return example.input_ids[:start], answer.strip()


@dataclass
class ScoreResult:
    """Exact-match score of generated answers, with per-field numbers where the task has them."""

    n: int
    exact: float
    fields: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    """A few (prompt, prediction, reference) triples to show in the report."""

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in self.fields.items())
        return f"exact match {self.exact:.1%} of {self.n}" + (f" ({parts})" if parts else "")

    def as_dict(self) -> dict:
        return asdict(self)


ONE_LINE_SCORERS = ("task-api",)
"""Scorers whose answers are one line (task-api's JSON): a row stops at its first line break."""


def line_breaks_for(scorer: str, tokenizer) -> tuple[int, ...] | None:
    """The stop ids `score_examples` uses for ``scorer`` (`lorakit.generation.line_break_ids`, about
    a second to compute), for callers that score more than once; None for multi-line answers."""
    return line_break_ids(tokenizer) if scorer in ONE_LINE_SCORERS else None


def score_examples(model, tokenizer, examples: Sequence[Example], *, scorer: str, max_new_tokens: int,
                   batch_size: int = 32, autocast: Callable | None = None, keep_samples: int = 5,
                   line_breaks: Sequence[int] | None = None) -> ScoreResult:
    """Greedy-generate an answer for each example's prompt, with the model as it is set up (its
    active adapters), and score it against the reference. ``line_breaks``: `line_breaks_for`
    (scorer, tokenizer), for callers that score more than once (computed when None)."""
    pairs = [split_prompt(e, tokenizer) for e in examples]
    predictions = generate_texts(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, autocast=autocast, one_line=scorer in ONE_LINE_SCORERS,
                                 line_breaks=line_breaks)
    references = [r for _, r in pairs]
    exact, fields = SCORERS[scorer](predictions, references)
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "prediction": pred, "reference": ref}
               for (p, ref), pred in list(zip(pairs, predictions))[:keep_samples]]
    return ScoreResult(len(examples), exact, fields, samples)


def evaluate_adapter(adapter_dir: str | os.PathLike, *, model: str | None = None, data: str = "task-api",
                     examples: int = 200, max_new_tokens: int = 64, batch_size: int = 32) -> ScoreResult:
    """Score an adapter directory on held-out data: task-api's held-out split, or every record
    of a JSONL file."""
    peft_model, tokenizer = load_adapted(adapter_dir, model=model)
    splits = load_data(data, tokenizer=tokenizer, max_length=None)
    heldout = splits.val if splits.val is not None else splits.train
    return score_examples(peft_model, tokenizer, list(heldout.examples[:examples]), scorer=scorer_for(data),
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
