"""Read JSONL training records and check their shape, before any tokenizer is involved.

Three record shapes, one JSON object per line (other keys, such as ``"id"``, are ignored)::

    {"text": "..."}                                    loss on every token
    {"prompt": "...", "completion": "..."}             loss on the completion (and EOS)
    {"messages": [{"role": "user", "content": "..."},  loss on the assistant turns
                  {"role": "assistant", "content": "..."}]}

A bad record raises ``DataError("file:line: reason; fix")`` at the first one, or, with
``skip_bad_records=True``, is skipped and counted under its reason (the ``REASONS`` below).
Blank lines are not records and are passed over.

The file is read as bytes and split on ``\\n`` only (a ``\\r\\n`` ending is fine; a bare ``\\r``, a
form feed or U+2028 inside a line neither splits it nor shifts later line numbers), and each line
is decoded as UTF-8 on its own, so a bad byte is one bad line. A UTF-8 byte-order mark at the start
of the file is passed over. A line may nest arrays and objects ``MAX_DEPTH`` deep and hold
``MAX_LINE_BYTES``; every string the trainer reads must be valid Unicode (no lone surrogate).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = [
    "MAX_DEPTH", "MAX_LINE_BYTES", "ROLES", "REASONS", "Record", "RecordError", "parse_record", "read_jsonl",
    "records_from_dicts", "reject", "messages_of", "SHAPES", "RECORD_FIELDS", "data_field_map", "jsonl_rows", "parsed",
]

ROLES = ("system", "user", "assistant")

MAX_DEPTH = 100  # arrays and objects inside each other on one line (a chat record needs 3)
MAX_LINE_BYTES = 64 * 2**20  # one line, one record: 64 MiB is millions of tokens

# Why a record is unusable: the keys of the skip counts, each with the fix that goes in the error.
REASONS: dict[str, str] = {
    "invalid_json": "each line must be one JSON object",
    "invalid_utf8": "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8 in.jsonl > out.jsonl)",
    "invalid_text": "strings must be valid Unicode: a \\ud800-\\udfff escape must be half of a surrogate pair",
    "too_deep": f"a line may nest arrays and objects at most {MAX_DEPTH} levels deep",
    "too_large": f"a line may hold at most {MAX_LINE_BYTES // 2**20} MiB; split the text into several records",
    "duplicate_key": "each key may appear only once in an object (which value was meant is unclear)",
    "wrong_type": "text, prompt, completion and content must be strings, messages an array of objects",
    "missing_field": 'a record needs "text", or "prompt" and "completion", or "messages" '
    '(each message with "role" and "content"), or Alpaca\'s "instruction"/"output", or ShareGPT\'s '
    '"conversations"; map other column names with --field FIELD=COLUMN',
    "ambiguous_shape": "give --format SHAPE (text, completion, chat, alpaca or sharegpt) to say which it is",
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

_SKIP_HINT = "pass skip_bad_records=True (--skip-bad-records) to skip and count bad records"
_BOM = b"\xef\xbb\xbf"
# a JSON string (possibly unterminated: it then runs to the end) or one bracket, left to right
_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*+"?|[\[\]{}]')


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
    shape: str = ""  # the shape it was read as (`SHAPES`: alpaca and sharegpt are read as chat)

    @property
    def kind(self) -> str:
        """``"chat"``, ``"completion"`` or ``"text"``."""
        if self.messages is not None:
            return "chat"
        return "completion" if self.completion is not None else "text"


def _json_type(value: object) -> str:
    """What ``value`` is called in JSON: a string, a number, an array, an object, true, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    names = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _string(obj: Mapping, key: str, where: str = "") -> str:
    if key not in obj:
        raise RecordError("missing_field", f'missing field "{key}"{where}')
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f'field "{key}"{where} is {_json_type(value)}, not a string')
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: no tokenizer can take it
            code = ord(value[exc.start])
            raise RecordError("invalid_text", f'field "{key}"{where} holds a lone surrogate '
                                              f"\\u{code:04x} at character {exc.start}") from None
    return value


def messages_of(value: object, key: str = "messages") -> tuple[dict[str, str], ...]:
    """The chat messages of field ``key``: a non-empty array of objects with a known role and
    string content each; RecordError naming the first that is not."""
    if not isinstance(value, list):
        raise RecordError("wrong_type", f'field "{key}" is {_json_type(value)}, not an array')
    if not value:
        raise RecordError("empty_messages", f'field "{key}" is an empty array')
    out = []
    for i, message in enumerate(value):
        where = f" of {key}[{i}]"
        if not isinstance(message, dict):
            raise RecordError("wrong_type", f"{key}[{i}] is {_json_type(message)}, not an object")
        role, content = _string(message, "role", where), _string(message, "content", where)
        if role not in ROLES:
            raise RecordError("unknown_role", f"{key}[{i}] has role {role!r}")
        out.append({"role": role, "content": content})
    return tuple(out)


def _messages(value: object) -> tuple[dict[str, str], ...]:
    out = messages_of(value)
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no_assistant_turn", "no message has role 'assistant'")
    return tuple(out)


SHAPES: dict[str, tuple[str, ...]] = {
    "text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",),
    "alpaca": ("instruction", "input", "output"), "sharegpt": ("conversations",),
}
"""The record shapes and the fields that mark each: a record is read as the one shape whose fields
it has (``record_format`` chooses when it has several)."""
RECORD_FIELDS = sorted({name for fields in SHAPES.values() for name in fields} | {"system"})
"""The record fields a column can be mapped to (`data_field_map`, ``--field``)."""


def data_field_map(pairs: Any) -> dict[str, str] | None:
    """``data_fields`` (["prompt=question", ...]) as {field: column}, or None when malformed."""
    if not isinstance(pairs, list):
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        field_name, sep, column = pair.partition("=") if isinstance(pair, str) else ("", "", "")
        if not sep or field_name not in RECORD_FIELDS or not column or field_name in out:
            return None
        out[field_name] = column
    return out


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _shapes_text() -> str:
    return "; ".join(f"{name} ({'/'.join(fields)})" for name, fields in SHAPES.items())


def _text_record(obj: Mapping, source: str) -> Record:
    text = _string(obj, "text")
    if not text.strip():
        raise RecordError("empty_text", 'field "text" is empty')
    return Record(source, text=text)


def _completion_record(obj: Mapping, source: str) -> Record:
    prompt, completion = _string(obj, "prompt"), _string(obj, "completion")
    if not completion.strip():
        raise RecordError("empty_text", 'field "completion" is empty')
    return Record(source, prompt=prompt, completion=completion)


def _alpaca_record(obj: Mapping, source: str) -> Record:
    """Alpaca: the instruction (and its input, after a blank line) as the user's turn, the output as
    the assistant's, an optional ``system`` first; rendered with the model's chat template."""
    instruction, output = _string(obj, "instruction"), _string(obj, "output")
    extra = _string(obj, "input") if obj.get("input") is not None else ""
    if not output.strip():
        raise RecordError("empty_text", 'field "output" is empty')
    system = [{"role": "system", "content": _string(obj, "system")}] if obj.get("system") else []
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = system + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Record(source, messages=tuple(messages))


def _sharegpt_record(obj: Mapping, source: str) -> Record:
    """ShareGPT: ``conversations`` of ``{"from": human|gpt|system, "value": ...}``, read as messages."""
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise RecordError("wrong_type", f'field "conversations" is {_json_type(turns)}, not an array')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"conversations[{i}] is {_json_type(turn)}, not an object")
        who = _string(turn, "from", f" of conversations[{i}]")
        if who not in SHAREGPT_ROLES:
            raise RecordError("unknown_role", f"conversations[{i}] is from {who!r}; ShareGPT turns are from "
                                              f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[who], "content": _string(turn, "value", f" of conversations[{i}]")})
    return Record(source, messages=_messages(messages))


_READERS = {"text": _text_record, "completion": _completion_record, "alpaca": _alpaca_record,
            "sharegpt": _sharegpt_record, "chat": lambda obj, source: Record(source, messages=_messages(obj["messages"]))}


def _mapped(obj: dict, fields: Mapping[str, str]) -> dict:
    """``obj`` with each column named in ``fields`` (record field -> column) read as that field."""
    out = {k: v for k, v in obj.items() if k not in fields.values()}
    for field_name, column in fields.items():
        if column not in obj:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise RecordError("missing_field", f'no column "{column}" for field "{field_name}" (keys: {keys})')
        out[field_name] = obj[column]
    return out


def parse_record(obj: object, source: str, record_format: str | None = None,
                 fields: Mapping[str, str] | None = None) -> Record:
    """Check one decoded JSON value and return it as a Record; raise RecordError if unusable.

    The shape is the one whose fields the record has (`SHAPES`), or ``record_format``; ``fields``
    maps record fields to the columns that hold them (``{"prompt": "question"}``)."""
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", f"the line is {_json_type(obj)}, not an object")
    if fields:
        obj = _mapped(obj, fields)
    shape = record_format
    if shape is None:
        found = [name for name, marks in SHAPES.items() if any(k in obj for k in marks)]
        keys = ", ".join(sorted(map(str, obj))) or "none"
        if not found:
            raise RecordError("missing_field", f'no "text", "prompt"/"completion", "messages", Alpaca "instruction"/'
                                               f'"output" or ShareGPT "conversations" field (keys: {keys})')
        if len(found) > 1 and not (found == ["text", "chat"] or found == ["completion", "chat"]):
            raise RecordError("ambiguous_shape", f"the fields {keys} fit the shapes {' and '.join(found)}")
        shape = "chat" if "chat" in found else found[0]
    if shape not in _READERS:
        raise RecordError("missing_field", f"record_format={shape!r} is not a shape; the shapes: {_shapes_text()}")
    return dataclasses.replace(_READERS[shape](obj, source), shape=shape)


def reject(error: RecordError, source: str, skipped: Counter | None, reasons: Mapping[str, str] = REASONS) -> None:
    """Count ``error`` in ``skipped`` when skipping bad records, else raise it as a DataError
    with the fix ``reasons`` gives for its reason."""
    if skipped is None:
        raise DataError(f"{source}: {error.detail}; {reasons[error.reason]}; or {_SKIP_HINT}") from None
    skipped[error.reason] += 1


def _too_deep(line: bytes) -> bool:
    """Whether arrays and objects nest more than MAX_DEPTH deep (brackets inside strings aside)."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(line):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for i, key in enumerate(keys) if key in keys[:i])
        raise RecordError("duplicate_key", f'key "{repeated}" appears more than once in one object')
    return obj


def _decode(line: bytes) -> object:
    """The JSON value on one line (its ending already removed); RecordError if it is not one."""
    if len(line) > MAX_LINE_BYTES:
        raise RecordError("too_large", f"the line is longer than {MAX_LINE_BYTES:,} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("invalid_utf8", f"invalid UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} "
                                          "of the line)") from None
    if _too_deep(line):
        raise RecordError("too_deep", f"arrays and objects nest more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Invalid control character"):  # a raw tab, CR, NUL ... inside a string
            code = ord(exc.doc[exc.pos])
            raise RecordError("invalid_json", f"invalid JSON (a raw control character U+{code:04X} inside a "
                                              f"string at column {exc.colno}; write it escaped, as \\u{code:04x})"
                              ) from None
        message = exc.msg.removesuffix(" at")  # "Unterminated string starting at"
        raise RecordError("invalid_json", f"invalid JSON ({message} at column {exc.colno})") from None
    except RecursionError:  # deeper than this interpreter's stack, though within MAX_DEPTH
        raise RecordError("too_deep", "arrays and objects nest too deep to parse") from None


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its ending) for each ``\\n``-terminated line of a binary file;
    a line over MAX_LINE_BYTES is not held: it comes back as MAX_LINE_BYTES + 1 bytes."""
    for lineno in itertools.count(1):
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass  # read past the rest of an over-long line
        elif lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        yield lineno, line.rstrip(b"\n").removesuffix(b"\r")


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """(``file:line``, the line's JSON value or the RecordError that says why it is not one) for
    each non-blank line of a JSONL file, read one line at a time."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass the path of a .jsonl file")
    with path.open("rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                            f"save it as UTF-8 (for example: iconv -f utf-16 -t utf-8 in.jsonl > out.jsonl)")
        f.seek(0)
        for lineno, line in _lines(f):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                yield source, _decode(line)
            except RecordError as error:
                yield source, error


def parsed(rows: Iterable[tuple[str, object]], *, skipped: Counter | None, parse: Callable[[object, str], Any] = None,
           reasons: Mapping[str, str] = REASONS) -> Iterator:
    """The records of ``rows`` (source, value or RecordError) as ``parse`` (``parse_record``)
    reads them; a bad one raises DataError naming its source, or with a ``skipped`` counter is
    counted there under its reason."""
    parse = parse or parse_record
    for source, value in rows:
        try:
            if isinstance(value, RecordError):
                raise value
            yield parse(value, source)
        except RecordError as error:
            reject(error, source, skipped, reasons)


def read_jsonl(path: str | Path, *, skip_bad_records: bool = False, parse: Callable[[object, str], Any] = None,
               reasons: Mapping[str, str] = REASONS) -> tuple[list, Counter]:
    """Read a JSONL file into Records, and the counts of skipped records by reason.

    Without ``skip_bad_records`` the first bad record raises DataError naming ``file:line``.
    ``parse`` (``parse_record`` unless given) checks each decoded line, and ``reasons`` holds the
    fix each error names (preference pairs: `lorakit.data.preference`).
    """
    skipped: Counter = Counter()
    records = list(parsed(jsonl_rows(path), skipped=skipped if skip_bad_records else None, parse=parse,
                          reasons=reasons))
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
