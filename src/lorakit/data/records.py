"""Read JSONL training records and check their shape, before any tokenizer is involved.

Three record shapes, one JSON object per line (other keys, such as ``"id"``, are ignored)::

    {"text": "..."}                                    loss on every token
    {"prompt": "...", "completion": "..."}             loss on the completion (and EOS)
    {"messages": [{"role": "user", "content": "..."},  loss on the assistant turns
                  {"role": "assistant", "content": "..."}]}

A bad record raises ``DataError("file:line: reason; fix")`` at the first one, or, with
``skip_bad_records=True``, is skipped and counted under its reason (the ``REASONS`` below).
Blank lines are not records and are passed over.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

__all__ = [
    "ROLES", "REASONS", "Record", "RecordError", "parse_record", "read_jsonl", "records_from_dicts", "reject",
]

ROLES = ("system", "user", "assistant")

# Why a record is unusable: the keys of the skip counts, each with the fix that goes in the error.
REASONS: dict[str, str] = {
    "invalid_json": "each line must be one JSON object",
    "wrong_type": "text, prompt, completion and content must be strings, messages a list of objects",
    "missing_field": 'a record needs "text", or "prompt" and "completion", or "messages" '
    '(each message with "role" and "content")',
    "empty_text": "text and completion must not be empty",
    "empty_messages": "a chat record needs at least one user and one assistant message",
    "unknown_role": f"a message role must be one of {', '.join(ROLES)}",
    "no_assistant_turn": "a chat record needs at least one assistant message to learn from",
    "template_mismatch": "the chat template must render each conversation prefix as a prefix of "
    "the whole conversation (start with a system or user message)",
    "too_long": "raise max_length, or pass overlong='truncate' or 'drop'",
    "no_loss_tokens": "the example has no tokens to learn from (its answer was truncated away); "
    "raise max_length or shorten it",
}

_SKIP_HINT = "pass skip_bad_records=True to skip and count bad records"


class RecordError(Exception):
    """A record is unusable for ``reason`` (a key of REASONS); ``detail`` says what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Record:
    """One example as read, before tokenization: exactly one of the three shapes is set."""

    source: str  # "file:line", where it came from (for messages)
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def kind(self) -> str:
        """``"chat"``, ``"completion"`` or ``"text"``."""
        if self.messages is not None:
            return "chat"
        return "completion" if self.completion is not None else "text"


def _string(obj: Mapping, key: str, where: str = "") -> str:
    if key not in obj:
        raise RecordError("missing_field", f'missing field "{key}"{where}')
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f'field "{key}"{where} is {type(value).__name__}, not a string')
    return value


def _messages(value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list):
        raise RecordError("wrong_type", f'field "messages" is {type(value).__name__}, not a list')
    if not value:
        raise RecordError("empty_messages", 'field "messages" is an empty list')
    out = []
    for i, message in enumerate(value):
        where = f" of messages[{i}]"
        if not isinstance(message, dict):
            raise RecordError("wrong_type", f"messages[{i}] is {type(message).__name__}, not an object")
        role, content = _string(message, "role", where), _string(message, "content", where)
        if role not in ROLES:
            raise RecordError("unknown_role", f"messages[{i}] has role {role!r}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no_assistant_turn", "no message has role 'assistant'")
    return tuple(out)


def parse_record(obj: object, source: str) -> Record:
    """Check one decoded JSON value and return it as a Record; raise RecordError if unusable."""
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", f"the line is a JSON {type(obj).__name__}, not an object")
    if "messages" in obj:
        return Record(source, messages=_messages(obj["messages"]))
    if "prompt" in obj or "completion" in obj:
        prompt, completion = _string(obj, "prompt"), _string(obj, "completion")
        if not completion.strip():
            raise RecordError("empty_text", 'field "completion" is empty')
        return Record(source, prompt=prompt, completion=completion)
    if "text" in obj:
        text = _string(obj, "text")
        if not text.strip():
            raise RecordError("empty_text", 'field "text" is empty')
        return Record(source, text=text)
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise RecordError("missing_field", f'no "text", "prompt"/"completion" or "messages" field (keys: {keys})')


def reject(error: RecordError, source: str, skipped: Counter | None) -> None:
    """Count ``error`` in ``skipped`` when skipping bad records, else raise it as a DataError."""
    if skipped is None:
        raise DataError(f"{source}: {error.detail}; {REASONS[error.reason]}; or {_SKIP_HINT}") from None
    skipped[error.reason] += 1


def read_jsonl(path: str | Path, *, skip_bad_records: bool = False) -> tuple[list[Record], Counter]:
    """Read a JSONL file into Records, and the counts of skipped records by reason.

    Without ``skip_bad_records`` the first bad record raises DataError naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass the path of a .jsonl file")
    skipped: Counter = Counter()
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    detail = f"invalid JSON ({exc.msg} at column {exc.colno})"
                    raise RecordError("invalid_json", detail) from None
                records.append(parse_record(obj, source))
            except RecordError as error:
                reject(error, source, skipped if skip_bad_records else None)
    return records, skipped


def records_from_dicts(dicts: Iterable[object], name: str) -> list[Record]:
    """Records from in-memory objects (a built-in dataset); ``name`` labels them ``name:index``."""
    out = []
    for i, obj in enumerate(dicts, start=1):
        try:
            out.append(parse_record(obj, f"{name}:{i}"))
        except RecordError as error:
            reject(error, f"{name}:{i}", None)
    return out
