"""Reading a run's metrics.jsonl: the training log the trainer writes, one JSON object a line.

    {"kind": "train", "step": 10, "epoch": 0.1, "loss": 2.31, "lr": 0.0002, "grad_norm": 1.4,
     "tokens": 20480, "elapsed_s": 12.5}
    {"kind": "eval", "step": 100, "eval_loss": 1.87}

Other kinds (``"score"``, ...) and unknown keys are skipped. A non-finite value may be written
as ``null`` or ``NaN``; both read as ``nan``. When a step appears twice (a run resumed from a
checkpoint logs the steps after it again) the later line wins. A line that is not such an object
is a `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError

__all__ = ["TrainPoint", "EvalPoint", "Metrics", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainPoint:
    step: int
    loss: float  # nan when not finite
    epoch: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    elapsed_s: float | None = None


@dataclass(frozen=True)
class EvalPoint:
    step: int
    eval_loss: float  # nan when not finite


@dataclass(frozen=True)
class Metrics:
    """A run's log: training steps and evaluations, each in step order."""

    path: str
    train: tuple[TrainPoint, ...]
    evals: tuple[EvalPoint, ...]
    skipped: int  # lines of other kinds
    replaced: int  # lines superseded by a later line for the same step (a resumed run)


def read_metrics(path: str | os.PathLike) -> Metrics:
    """The metrics of a run directory (its metrics.jsonl) or of a metrics file."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a run directory (with {METRICS_FILE}) or "
                        "the metrics file itself")
    train: dict[int, TrainPoint] = {}
    evals: dict[int, EvalPoint] = {}
    skipped = replaced = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not JSON ({err.msg}): {line.strip()[:80]!r}") from err
            if not isinstance(record, dict) or "kind" not in record:
                raise DataError(f"{where}: expected an object with a \"kind\" "
                                "(\"train\" or \"eval\")")
            if record["kind"] == "train":
                point = TrainPoint(
                    step=_int(record, "step", where), loss=_number(record, "loss", where),
                    epoch=_optional(record, "epoch", where), lr=_optional(record, "lr", where),
                    grad_norm=_optional(record, "grad_norm", where),
                    tokens=_optional_int(record, "tokens", where),
                    elapsed_s=_optional(record, "elapsed_s", where))
                replaced += point.step in train
                train[point.step] = point
            elif record["kind"] == "eval":
                point = EvalPoint(step=_int(record, "step", where),
                                  eval_loss=_number(record, "eval_loss", where))
                replaced += point.step in evals
                evals[point.step] = point
            else:
                skipped += 1
    return Metrics(path=str(path), train=tuple(train[s] for s in sorted(train)),
                   evals=tuple(evals[s] for s in sorted(evals)), skipped=skipped,
                   replaced=replaced)


def _int(record: dict, key: str, where: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {key!r} must be an integer, got {value!r}")
    return value


def _number(record: dict, key: str, where: str) -> float:
    if key not in record:
        raise DataError(f"{where}: missing {key!r}")
    value = _optional(record, key, where)
    return math.nan if value is None else value


def _optional(record: dict, key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return math.nan if key in record else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {key!r} must be a number or null, got {value!r}")
    return float(value)


def _optional_int(record: dict, key: str, where: str) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {key!r} must be an integer, got {value!r}")
    return value
