"""Lines an unlucky or hostile file holds: bad bytes, lone surrogates, deep nesting, odd line
breaks, a byte-order mark. Each is one bad line named `file:line: reason`, or skipped and counted,
and never shifts the line numbers after it."""

import json

import pytest

from lorakit.cli import main
from lorakit.data import REASONS, read_jsonl, records_from_dicts
from lorakit.data import records as records_module
from lorakit.errors import DataError

GOOD = b'{"text": "good"}'


def _write(path, *lines: bytes, end=b"\n"):
    path.write_bytes(end.join(lines) + end)
    return path


def _refused(path, line: int, reason: str) -> str:
    """The DataError for ``path``: it names ``path:line`` and the fix for ``reason``; its message."""
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert REASONS[reason] in message and "--skip-bad-records" in message
    return message


def _skipped(path, reason: str, kept: list[int]) -> None:
    records, skipped = read_jsonl(path, skip_bad_records=True)
    assert dict(skipped) == {reason: 1}
    assert [r.source for r in records] == [f"{path}:{n}" for n in kept]


def test_invalid_utf8_is_one_bad_line_not_the_whole_file(tmp_path):
    path = _write(tmp_path / "latin1.jsonl", GOOD, '{"text": "café"}'.encode("latin-1"), GOOD)
    message = _refused(path, 2, "invalid_utf8")
    assert "invalid UTF-8 (byte 0xe9" in message
    _skipped(path, "invalid_utf8", kept=[1, 3])


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes('{"text": "good"}\n'.encode("utf-16"))
    for skip in (False, True):
        with pytest.raises(DataError, match=r"UTF-16.*iconv -f utf-16 -t utf-8"):
            read_jsonl(path, skip_bad_records=skip)


@pytest.mark.parametrize("line", [
    rb'{"text": "a\ud800b"}',
    rb'{"prompt": "\udfff", "completion": "fine"}',
    rb'{"prompt": "fine", "completion": "x\udc00"}',
    rb'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\ud83d"}]}',
])
def test_a_lone_surrogate_is_invalid_text(tmp_path, line):
    path = _write(tmp_path / "surrogate.jsonl", GOOD, line, GOOD)
    message = _refused(path, 2, "invalid_text")
    assert "lone surrogate" in message
    _skipped(path, "invalid_text", kept=[1, 3])


def test_a_surrogate_pair_is_one_character(tmp_path):
    path = _write(tmp_path / "emoji.jsonl", rb'{"text": "smile \ud83d\ude00"}')
    records, _ = read_jsonl(path)
    assert records[0].text == "smile \U0001F600"


def test_in_memory_records_are_checked_for_lone_surrogates_too():
    with pytest.raises(DataError, match=r"built-in:1: .*lone surrogate \\ud800"):
        records_from_dicts([{"prompt": "q", "completion": "\ud800"}], "built-in")


def test_deep_nesting_is_too_deep_not_a_recursion_error(tmp_path):
    deep = b'{"text": "x", "extra": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = _write(tmp_path / "deep.jsonl", GOOD, deep, GOOD)
    message = _refused(path, 2, "too_deep")
    assert f"more than {records_module.MAX_DEPTH} levels" in message
    _skipped(path, "too_deep", kept=[1, 3])


def test_brackets_inside_strings_are_text_not_nesting(tmp_path):
    text = "[{" * 5_000 + '"\\'
    path = _write(tmp_path / "brackets.jsonl", json.dumps({"text": text}).encode())
    records, _ = read_jsonl(path)
    assert records[0].text == text


def test_nesting_within_the_bound_is_read(tmp_path):
    depth = records_module.MAX_DEPTH - 1  # the record's own object is one level
    line = b'{"text": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"
    records, _ = read_jsonl(_write(tmp_path / "ok.jsonl", line))
    assert records[0].text == "x"


def test_a_byte_order_mark_at_the_start_is_passed_over(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD + b"\n")
    records, skipped = read_jsonl(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"] and not skipped


@pytest.mark.parametrize("breaker", ["\r", "\u2028", "\u2029", "\x85"])
def test_only_newline_ends_a_line(tmp_path, breaker):
    # between tokens (\r is JSON whitespace) or inside a string (U+2028, U+2029, U+0085 are text)
    line = '{"text": "a",\r"id": 1}' if breaker == "\r" else f'{{"text": "a{breaker}b"}}'
    path = _write(tmp_path / "breaks.jsonl", GOOD, line.encode(), b'{"text": "last"}')
    records, skipped = read_jsonl(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2", f"{path}:3"] and not skipped
    assert records[2].text == "last"


@pytest.mark.parametrize("char", [b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x00"])
def test_a_raw_control_character_in_a_string_is_named_on_its_own_line(tmp_path, char):
    path = _write(tmp_path / "control.jsonl", GOOD, b'{"text": "a' + char + b'b"}', GOOD)
    message = _refused(path, 2, "invalid_json")
    assert f"raw control character U+{ord(char):04X}" in message
    _skipped(path, "invalid_json", kept=[1, 3])


def test_crlf_endings_are_read(tmp_path):
    path = _write(tmp_path / "crlf.jsonl", GOOD, b"", b'{"text": "b"}', end=b"\r\n")
    records, _ = read_jsonl(path)
    assert [(r.source, r.text) for r in records] == [(f"{path}:1", "good"), (f"{path}:3", "b")]


def test_a_duplicate_key_is_refused(tmp_path):
    path = _write(tmp_path / "dup.jsonl", GOOD, b'{"prompt": "a", "completion": "b", "prompt": "c"}', GOOD)
    assert 'key "prompt" appears more than once' in _refused(path, 2, "duplicate_key")
    _skipped(path, "duplicate_key", kept=[1, 3])


def test_a_line_over_the_size_bound_is_too_large_and_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "MAX_LINE_BYTES", 1000)
    huge = json.dumps({"text": "x" * 5000}).encode()
    path = _write(tmp_path / "huge.jsonl", GOOD, huge, GOOD, b'{"text": "' + b"y" * 980 + b'"}')
    assert "longer than 1,000 bytes" in _refused(path, 2, "too_large")
    _skipped(path, "too_large", kept=[1, 3, 4])


def test_cli_train_names_the_bad_line_then_skips_it(tiny_model_dir, tmp_path, capsys):
    good = json.dumps({"prompt": "say hi", "completion": "hi"}).encode()
    data = _write(tmp_path / "bad.jsonl", *[good] * 8, b'{"prompt": "caf\xe9", "completion": "x"}', good)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--eval-every", "0", "--score-examples", "0", "--save-every", "0", "--precision", "fp32",
            "--no-progress", "--run-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {data}:9: invalid UTF-8" in err and "--skip-bad-records" in err and "Traceback" not in err

    assert main([*args, "--skip-bad-records", "--run-dir", str(tmp_path / "run2")]) == 0
    assert "invalid_utf8: 1" in (tmp_path / "run2" / "report.md").read_text()


def test_every_reason_has_a_fix():
    assert {"invalid_utf8", "invalid_text", "too_deep", "too_large", "duplicate_key"} <= set(REASONS)
