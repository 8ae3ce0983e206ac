"""Reading JSONL records: each bad-record kind is named with its file:line, or skipped and counted."""

import json

import pytest

from lorakit.data import REASONS, read_jsonl
from lorakit.errors import DataError

GOOD = [
    {"text": "plain text"},
    {"prompt": "Q: 2+2?", "completion": "4"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]

# (reason, the bad line, a word the message must contain)
BAD = [
    ("invalid_json", '{"text": "unterminated', "invalid JSON"),
    ("wrong_type", '["a", "list"]', "the line is an array, not an object"),
    ("wrong_type", '{"text": 42}', '"text" is a number'),
    ("wrong_type", '{"messages": "hello"}', '"messages" is a string, not an array'),
    ("wrong_type", '{"messages": [{"role": "user", "content": ["x"]}]}', '"content" of messages[0] is an array'),
    ("missing_field", '{"prompt": "only a prompt"}', 'missing field "completion"'),
    ("missing_field", '{"id": 7}', 'no "text"'),
    ("missing_field", '{"messages": [{"content": "who am I"}]}', 'missing field "role" of messages[0]'),
    ("empty_text", '{"text": "   "}', '"text" is empty'),
    ("empty_messages", '{"messages": []}', "empty array"),
    ("unknown_role", '{"messages": [{"role": "robot", "content": "beep"}]}', "role 'robot'"),
    ("no_assistant_turn", '{"messages": [{"role": "user", "content": "hi"}]}', "no message has role 'assistant'"),
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_records_of_each_shape(tmp_path):
    path = _write(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    records, skipped = read_jsonl(path)
    assert [r.kind for r in records] == ["text", "completion", "chat"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert records[2].messages[1] == {"role": "assistant", "content": "hello"}
    assert not skipped


@pytest.mark.parametrize(("reason", "line", "words"), BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_first_bad_record_raises_with_file_and_line(tmp_path, reason, line, words):
    # line 1 good, line 2 blank (still counted in numbering), line 3 bad, line 4 good
    path = _write(tmp_path / "data.jsonl", [json.dumps(GOOD[0]), "", line, json.dumps(GOOD[1])])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert words in message
    assert REASONS[reason] in message  # the fix
    assert "skip_bad_records=True" in message


def test_skipping_counts_every_reason_exactly(tmp_path):
    lines = [json.dumps(r) for r in GOOD] + [line for _, line, _ in BAD] + ['{"text": ', '{"messages": []}']
    path = _write(tmp_path / "mixed.jsonl", lines)
    records, skipped = read_jsonl(path, skip_bad_records=True)
    assert len(records) == len(GOOD)
    expected = {}
    for reason, _, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    expected["invalid_json"] += 1
    expected["empty_messages"] += 1
    assert dict(skipped) == expected
    assert set(skipped) <= set(REASONS)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_extra_keys_are_ignored(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"id": 1, "text": "x", "meta": {"a": 1}})])
    records, _ = read_jsonl(path)
    assert records[0].text == "x"
