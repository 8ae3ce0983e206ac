"""39 kinds of broken data lines through lorakit's data reader: is each named `file:line: reason`,
or read correctly?

Each kind is one line (or one property of the file: a byte-order mark, CRLF endings) written
between good records of each shape, and the file goes through ``load_data`` with the real
tokenizer twice: as it is (a bad line must raise ``DataError`` starting ``file:line: ``, with the
reason's fix, naming the right line) and with ``skip_bad_records=True`` (the bad line must be
counted once under its reason and every good line kept, with its own line number). A kind that
is not a mistake (a BOM, U+2028 inside a string, a record longer than max_length) must be read
with its content intact, and what the trainer does to it said in the counts. Anything else is
bad: an untyped exception, a wrong line number, a record dropped or changed without a word.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/hostile/data_lines.py

prints the table and "N of 39 give file:line: reason or are accepted correctly" (about 3 s once
the default model's tokenizer is in lorakit's cache; the first run converts it, about 20 s).
``--train`` also runs ``lorakit train`` (a subprocess, a tiny random model with the real
tokenizer, one step) on the kinds of ``TRAIN_KINDS``: a bad line must exit 2 with one line
``error: file:line: reason`` and no traceback, and with ``--skip-bad-records`` train, its report
counting the line under its reason; a good one must train (about two minutes on two cores).
``PYTHONPATH`` pointing at another checkout's ``src`` runs the same campaign against that code.
``tests/data/test_hostile_table.py`` runs every kind too (the size-bound kind with a small bound).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.data import REASONS, load_data
from lorakit.data import records as records_module
from lorakit.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when the tests load this file
from tiny import tiny_model  # noqa: E402

# The good lines around the bad one: one of each record shape.
GOOD = [
    b'{"text": "good text"}',
    b'{"prompt": "2+2?", "completion": "4"}',
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
]
ACCEPTED = "accepted"


@dataclass(frozen=True)
class Kind:
    """A broken line and what lorakit should do with it: refuse it for ``expect`` (a key of
    REASONS) at ``file:2``, or read it (``ACCEPTED``) so that ``check(dataset, text)`` holds."""

    name: str
    line: bytes | Callable[[], bytes]  # a callable for a line built when the file is written
    expect: str
    check: Callable | None = None  # (the TokenizedDataset, the text read from line 2) -> a problem or None
    options: dict = field(default_factory=dict)  # load_data's max_length and overlong
    layout: str = "plain"  # "bom": a UTF-8 BOM starts the file (the bad "line" is line 1); "crlf": CRLF endings
    kept: bool = True  # whether an accepted line becomes an example (one with no answer left does not)


def _huge_line() -> bytes:
    text = "x" * (getattr(records_module, "MAX_LINE_BYTES", 64 * 2**20) + 1)
    return json.dumps({"text": text}).encode()


def _text_is(expected: str) -> Callable:
    def check(dataset, text):
        return None if text == expected else f"read as {text!r}, not {expected!r}"
    return check


def _truncated(dataset, text):
    long = [e for e in dataset.examples if e.source.endswith(":2")]
    if dataset.truncated != 1 or not long or len(long[0]) != 64:
        return f"truncated={dataset.truncated}; the long record should be kept, cut to 64 tokens, and counted"
    return None


def _answer_cut_away(dataset, text):
    if dataset.skipped != {"no_loss_tokens": 1} or any(e.source.endswith(":2") for e in dataset.examples):
        return f"skipped={dataset.skipped}; a record with no answer left must be left out and counted"
    return None


def _msgs(*messages) -> bytes:
    return json.dumps({"messages": [dict(zip(("role", "content"), m)) for m in messages]}).encode()


KINDS: list[Kind] = [
    # not JSON, or not one object
    Kind("truncated JSON", b'{"text": "cut off he', "invalid_json"),
    Kind("trailing garbage", b'{"text": "a"} and more', "invalid_json"),
    Kind("line is an array", b'["text", "a"]', "wrong_type"),
    Kind("line is a number", b"42", "wrong_type"),
    Kind("line is a string", b'"just text"', "wrong_type"),
    Kind("line is null", b"null", "wrong_type"),
    # fields missing or of the wrong type
    Kind("no known field", b'{"id": 7, "body": "x"}', "missing_field"),
    Kind("missing prompt", b'{"completion": "4"}', "missing_field"),
    Kind("missing completion", b'{"prompt": "2+2?"}', "missing_field"),
    Kind("text is a number", b'{"text": 12}', "wrong_type"),
    Kind("prompt is a list", b'{"prompt": ["2+2?"], "completion": "4"}', "wrong_type"),
    Kind("completion is null", b'{"prompt": "2+2?", "completion": null}', "wrong_type"),
    Kind("completion is an object", b'{"prompt": "q", "completion": {"answer": 4}}', "wrong_type"),
    Kind("text is a bool", b'{"text": true}', "wrong_type"),
    Kind("text is NaN", b'{"text": NaN}', "wrong_type"),
    Kind("empty completion", b'{"prompt": "2+2?", "completion": ""}', "empty_text"),
    Kind("whitespace-only text", b'{"text": " \\t\\n "}', "empty_text"),
    # chat records
    Kind("messages not a list", b'{"messages": "hi"}', "wrong_type"),
    Kind("messages empty", b'{"messages": []}', "empty_messages"),
    Kind("message not an object", b'{"messages": ["hi", "hello"]}', "wrong_type"),
    Kind("message without role", b'{"messages": [{"content": "hi"}]}', "missing_field"),
    Kind("message without content", b'{"messages": [{"role": "user"}, {"role": "assistant"}]}', "missing_field"),
    Kind("content is a number", _msgs(("user", "hi"), ("assistant", 4)), "wrong_type"),
    Kind("unknown role", _msgs(("user", "hi"), ("tool", "{}"), ("assistant", "ok")), "unknown_role"),
    Kind("no assistant turn", _msgs(("system", "be brief"), ("user", "hi")), "no_assistant_turn"),
    Kind("assistant speaks first", _msgs(("assistant", "hello"), ("user", "hi"), ("assistant", "yes")),
         "template_mismatch"),
    Kind("duplicate key", b'{"prompt": "2+2?", "completion": "4", "completion": "5"}', "duplicate_key"),
    # bytes and text
    Kind("invalid UTF-8 (latin-1)", '{"text": "café"}'.encode("latin-1"), "invalid_utf8"),
    Kind("lone surrogate", b'{"prompt": "q", "completion": "a\\ud800b"}', "invalid_text"),
    Kind("raw NUL byte in a string", b'{"text": "a\x00b"}', "invalid_json"),
    Kind("raw control characters (VT FF FS GS RS) in a string", b'{"text": "a\x0b\x0c\x1c\x1d\x1eb"}',
         "invalid_json"),
    Kind("bare CR inside a string", b'{"text": "first\rsecond"}', "invalid_json"),
    # sizes and nesting
    Kind("nested 200,000 deep", b'{"text": "a", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "too_deep"),
    Kind("line over the size bound", _huge_line, "too_large"),
    # not mistakes: read, content intact
    Kind("UTF-8 BOM at the start", GOOD[0], ACCEPTED, _text_is("good text"), layout="bom"),
    Kind("bare CR between tokens, CRLF endings", b'{"text":\r"a",\r"id": 1}', ACCEPTED, _text_is("a"),
         layout="crlf"),
    Kind("U+2028, U+2029, U+0085 and escaped controls in a string",
         '{"text": "a\u2028b\u2029c\x85d\\u0000\\u001be"}'.encode(), ACCEPTED,
         _text_is("a\u2028b\u2029c\x85d\x00\x1be")),
    Kind("longer than max_length (trainer's default: truncate)", json.dumps({"text": "word " * 200}).encode(),
         ACCEPTED, _truncated, options={"max_length": 64}),
    Kind("answer truncated away by max_length", json.dumps({"prompt": "word " * 200, "completion": "4"}).encode(),
         ACCEPTED, _answer_cut_away, options={"max_length": 64}, kept=False),
]


def write_file(kind: Kind, path: Path) -> int:
    """Write ``kind``'s file to ``path``; the number of the line that holds the kind."""
    line = kind.line() if callable(kind.line) else kind.line
    if kind.layout == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([line, *GOOD[1:]]) + b"\n")
        return 1
    lines = [GOOD[0], line, *GOOD[1:]]
    end = b"\r\n" if kind.layout == "crlf" else b"\n"
    path.write_bytes(end.join(lines) + end)
    return 2


def _load(path: Path, tokenizer, kind: Kind, skip: bool):
    options = {"max_length": 1024, "overlong": "truncate", **kind.options}
    return load_data(path, tokenizer=tokenizer, skip_bad_records=skip, **options).train


def _text_of(dataset, lineno: int, tokenizer) -> str | None:
    for example in dataset.examples:
        if example.source.endswith(f":{lineno}"):
            return tokenizer.decode(example.input_ids, skip_special_tokens=True)
    return None


def _untyped(exc: BaseException) -> str:
    return f"untyped {type(exc).__name__}: {str(exc)[:80]}"


def classify(kind: Kind, tokenizer, directory: Path) -> tuple[bool, str]:
    """(good, what happened) for one kind."""
    path = directory / f"kind-{KINDS.index(kind):02d}.jsonl"
    lineno = write_file(kind, path)
    n_lines = len(GOOD) + (kind.layout != "bom")
    every_line = [f"{path}:{n}" for n in range(1, n_lines + 1)]
    try:
        strict = _load(path, tokenizer, kind, skip=False)
    except DataError as exc:
        strict, message = None, str(exc)
    except Exception as exc:  # noqa: BLE001 - what the campaign is looking for
        return False, _untyped(exc)
    try:
        skipping = _load(path, tokenizer, kind, skip=True)
    except Exception as exc:  # noqa: BLE001
        return False, f"with skip_bad_records: {_untyped(exc)}"
    kept = sorted({e.source for e in skipping.examples}, key=lambda s: int(s.rsplit(":", 1)[1]))

    if kind.expect == ACCEPTED:
        if strict is None:
            return False, f"refused: {message[len(str(directory)) + 1:][:90]}"
        sources = sorted({e.source for e in strict.examples}, key=lambda s: int(s.rsplit(":", 1)[1]))
        expected_sources = [s for s in every_line if kind.kept or s != f"{path}:{lineno}"]
        problem = kind.check(strict, _text_of(strict, lineno, tokenizer)) if kind.check else None
        if problem is None and sources != expected_sources:
            problem = f"lines read {[s.rsplit(':', 1)[1] for s in sources]}"
        if problem is None and (skipping.skipped != strict.skipped or kept != sources):
            problem = "read differently with skip_bad_records"
        return (False, problem) if problem else (True, "accepted" + _counted(strict))

    if strict is not None:
        lost = sorted(set(every_line) - {e.source for e in strict.examples})
        return False, f"no error; lines left out: {[s.rsplit(':', 1)[1] for s in lost]}, counts {strict.skipped}"
    where = f"{path}:{lineno}: "
    if not message.startswith(where):
        return False, f"wrong place: {message[:90]}"
    if REASONS.get(kind.expect, kind.expect) not in message:
        return False, f"not {kind.expect}: {message[len(where):][:90]}"
    if skipping.skipped != {kind.expect: 1}:
        return False, f"with skip_bad_records counted {skipping.skipped}, not {{{kind.expect!r}: 1}}"
    if kept != [s for s in every_line if s != f"{path}:{lineno}"]:
        return False, f"with skip_bad_records kept lines {[s.rsplit(':', 1)[1] for s in kept]}"
    return True, f"file:{lineno}: {kind.expect}: {message[len(where):].split(';')[0][:70]}"


def _counted(dataset) -> str:
    said = [f"{k} {v}" for k, v in sorted(dataset.skipped.items())]
    said += [f"truncated {dataset.truncated}"] if dataset.truncated else []
    return f" ({', '.join(said)})" if said else ""


def run(tokenizer, directory: Path) -> list[tuple[Kind, bool, str]]:
    return [(kind, *classify(kind, tokenizer, directory)) for kind in KINDS]


TRAIN_KINDS = ("truncated JSON", "invalid UTF-8 (latin-1)", "lone surrogate", "nested 200,000 deep",
               "UTF-8 BOM at the start", "bare CR between tokens, CRLF endings")


def _lorakit_train(model: Path, data: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    code = "import sys; from lorakit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["train", "--model", str(model), "--data", str(data), "--max-steps", "1", "--batch-size", "2",
            "--eval-every", "0", "--score-examples", "0", "--save-every", "0", "--precision", "fp32",
            "--no-progress", "--run-dir", str(run_dir), *extra]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


def classify_train(kind: Kind, model: Path, directory: Path) -> tuple[bool, str]:
    """(good, what happened) for one kind through ``lorakit train``."""
    path = directory / f"train-{KINDS.index(kind):02d}.jsonl"
    lineno = write_file(kind, path)
    end = b"\r\n" if kind.layout == "crlf" else b"\n"
    with path.open("ab") as f:
        f.write(end.join(GOOD * 2) + end)  # enough examples for a step
    rc, err = _lorakit_train(model, path, directory / f"run-{KINDS.index(kind):02d}")
    if "Traceback" in err:
        return False, f"exit {rc} with a traceback: {err.strip().splitlines()[-1][:80]}"
    if kind.expect == ACCEPTED:
        return (rc == 0, "trained" if rc == 0 else f"exit {rc}: {err.strip()[-90:]}")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # not the loading bars
    if rc != 2 or len(errors) != 1 or not errors[0].startswith(f"error: {path}:{lineno}: "):
        return False, f"exit {rc}: {(errors or [err.strip()])[-1][:90]}"
    run_dir = directory / f"run-{KINDS.index(kind):02d}-skip"
    rc, err = _lorakit_train(model, path, run_dir, "--skip-bad-records")
    report = (run_dir / "report.md").read_text() if (run_dir / "report.md").is_file() else ""
    if rc != 0 or f"{kind.expect}: 1" not in report:
        counted = f"{kind.expect}: 1" in report
        return False, f"with --skip-bad-records: exit {rc}, report counts {kind.expect}: {counted}"
    return True, f"exit 2, {errors[0][len(f'error: {directory}/'):][:60]}...; skipped, counted with --skip-bad-records"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer (default: smollm2-135m)")
    parser.add_argument("--train", action="store_true", help="also run `lorakit train` on a few kinds")
    args = parser.parse_args(argv)
    from lorakit.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(tokenizer, Path(tmp))
        if args.train:
            tiny = tiny_model(Path(tmp) / "tiny-model", tokenizer_dir=model_dir)
            trained = [(kind, *classify_train(kind, tiny, Path(tmp))) for kind in KINDS if kind.name in TRAIN_KINDS]
    width = max(len(kind.name) for kind, _, _ in rows)
    print(f"{'#':>2}  {'kind':<{width}}  {'expected':<17}  result")
    for i, (kind, good, what) in enumerate(rows, 1):
        print(f"{i:>2}  {kind.name:<{width}}  {kind.expect:<17}  {'ok ' if good else 'BAD'} {what}")
    n_good = sum(good for _, good, _ in rows)
    print(f"\n{n_good} of {len(rows)} give file:line: reason or are accepted correctly")
    if not args.train:
        return 0 if n_good == len(rows) else 1
    print("\nlorakit train:")
    for kind, good, what in trained:
        print(f"    {kind.name:<{width}}  {'ok ' if good else 'BAD'} {what}")
    n_trained = sum(good for _, good, _ in trained)
    print(f"\n{n_trained} of {len(trained)} through `lorakit train` exit with the typed message or train")
    return 0 if n_good == len(rows) and n_trained == len(trained) else 1


if __name__ == "__main__":
    sys.exit(main())
