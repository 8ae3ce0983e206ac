"""The built-in ``task-api`` dataset (to-do requests -> task JSON), its scorer and its preference pairs."""

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
from .preferences import (
    PREFERENCE_KINDS,
    PREFS_SEED,
    PreferencePair,
    generate_preferences,
    preference_pairs,
    rejected_answer,
)
from .score import TaskScore, parse_answer, score

__all__ = [
    "PREFERENCE_KINDS",
    "PREFS_SEED",
    "PreferencePair",
    "SEED",
    "SYSTEM",
    "TaskApiSplits",
    "TaskExample",
    "TaskScore",
    "export_jsonl",
    "format_task",
    "generate",
    "generate_preferences",
    "parse_answer",
    "preference_pairs",
    "prompt_messages",
    "rejected_answer",
    "score",
]
