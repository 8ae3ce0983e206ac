"""The built-in ``task-api`` dataset (to-do requests -> task JSON) and its scorer."""

from .generate import (
    SEED,
    SYSTEM,
    TaskApiSplits,
    TaskExample,
    export_jsonl,
    format_task,
    generate,
    prompt_messages,
)
from .score import TaskScore, parse_answer, score

__all__ = [
    "SEED",
    "SYSTEM",
    "TaskApiSplits",
    "TaskExample",
    "TaskScore",
    "export_jsonl",
    "format_task",
    "generate",
    "parse_answer",
    "prompt_messages",
    "score",
]
