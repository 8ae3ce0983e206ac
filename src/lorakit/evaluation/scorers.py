"""The task scorers: predictions against references, as (exact-match rate, per-field rates).

``task-api`` parses each answer as the task JSON and compares it field by field
(`lorakit.data.task_api.score`); ``exact`` compares the stripped texts. Both give the share of
answers that match, ``right / n``.
"""

from __future__ import annotations

from typing import Callable

from lorakit.data import task_api
from lorakit.data.task_api.generate import FIELDS

__all__ = ["Scorer", "SCORERS", "scorer_for", "task_api_score", "exact_text"]

Scorer = Callable[[list[str], list[str]], tuple[float, dict[str, float]]]


def task_api_score(predictions: list[str], references: list[str]) -> tuple[float, dict[str, float]]:
    result = task_api.score(predictions, references)
    return result.exact, {name: getattr(result, name) for name in FIELDS}


def exact_text(predictions: list[str], references: list[str]) -> tuple[float, dict[str, float]]:
    right = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return right / max(len(predictions), 1), {}


SCORERS: dict[str, Scorer] = {"task-api": task_api_score, "exact": exact_text}


def scorer_for(data: str) -> str:
    """task-api answers (and task-api-prefs' chosen ones) are scored field by field as JSON;
    anything else by exact text."""
    return "task-api" if data in ("task-api", "task-api-prefs") else "exact"
