"""Score task-api predictions: parse the model's answer as JSON and compare it with the reference.

Overall: the fraction of answers that are exactly the reference object (every field right and no
other keys). Per field: the fraction with that field right. An answer that is not one JSON
object (after stripping surrounding whitespace) is wrong on every count; a missing
``due_string`` equals ``null``; labels compare as a set (order does not matter to a to-do
service); ``priority`` must be the integer, not ``"4"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ...errors import DataError
from .generate import FIELDS

__all__ = ["TaskScore", "parse_answer", "score"]


@dataclass(frozen=True)
class TaskScore:
    n: int
    exact: float  # fraction of answers equal to the reference object
    title: float  # fraction with each field right
    due_string: float
    priority: float
    labels: float
    unparseable: int  # answers that were not one JSON object

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        fields = ", ".join(f"{name} {getattr(self, name):.1%}" for name in FIELDS)
        return f"exact {self.exact:.1%} of {self.n} ({fields}; unparseable {self.unparseable})"


def parse_answer(text: str) -> dict | None:
    """The JSON object in ``text``, or None if ``text`` is not exactly one JSON object."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _field_right(name: str, got: dict, want: dict) -> bool:
    value, expected = got.get(name), want.get(name)
    if name == "priority":
        return type(value) is int and value == expected
    if name == "labels":
        strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return strings and sorted(value) == sorted(expected)
    return value == expected


def score(predictions: Sequence[str], references: Sequence[dict | str]) -> TaskScore:
    """Score model answers against reference tasks (dicts, or their JSON as TaskExample.answer)."""
    if len(predictions) != len(references):
        raise DataError(
            f"score: {len(predictions)} predictions for {len(references)} references; pass one per example"
        )
    right = dict.fromkeys(FIELDS, 0)
    exact = unparseable = 0
    for prediction, reference in zip(predictions, references):
        want = json.loads(reference) if isinstance(reference, str) else reference
        got = parse_answer(prediction)
        if got is None:
            unparseable += 1
            continue
        ok = {name: _field_right(name, got, want) for name in FIELDS}
        for name in FIELDS:
            right[name] += ok[name]
        exact += all(ok.values()) and set(got) <= set(FIELDS)
    n = len(predictions)
    frac = (lambda k: k / n) if n else (lambda k: 0.0)
    return TaskScore(n, frac(exact), *(frac(right[name]) for name in FIELDS), unparseable=unparseable)
