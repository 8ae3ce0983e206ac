"""Tokenized datasets and load_data: max_length policies, all-masked examples, held-out splits."""

import json

import pytest

from lorakit.data import Record, load_data, tokenize_records
from lorakit.errors import ConfigError, DataError

pytestmark = pytest.mark.slow  # needs the converted default model's tokenizer


def _chat(user, answer, source="t:1"):
    return Record(source, messages=({"role": "user", "content": user}, {"role": "assistant", "content": answer}))


LONG = " ".join(["word"] * 200)


def test_truncate_keeps_the_first_max_length_tokens_and_counts(tokenizer):
    records = [Record("t:1", text=LONG), Record("t:2", text="short")]
    data = tokenize_records(records, tokenizer, max_length=32, overlong="truncate")
    assert data.lengths[0] == 32 and data.truncated == 1 and not data.skipped
    assert "truncated 1" in data.summary()


def test_drop_leaves_overlong_out_and_counts(tokenizer):
    records = [Record("t:1", text=LONG), Record("t:2", text="short"), Record("t:3", text=LONG)]
    data = tokenize_records(records, tokenizer, max_length=32, overlong="drop")
    assert len(data) == 1 and data.skipped == {"too_long": 2} and data.truncated == 0


def test_error_policy_names_file_and_line(tokenizer):
    with pytest.raises(DataError, match=r"^t:7: \d+ tokens, more than max_length=32"):
        tokenize_records([Record("t:7", text=LONG)], tokenizer, max_length=32, overlong="error")
    data = tokenize_records(
        [Record("t:7", text=LONG), Record("t:8", text="ok")], tokenizer,
        max_length=32, overlong="error", skip_bad_records=True,
    )
    assert data.skipped == {"too_long": 1}


def test_example_truncated_to_no_answer_is_dropped_and_counted(tokenizer):
    records = [_chat(LONG, "the answer", "t:1"), _chat("short question", "the answer", "t:2")]
    data = tokenize_records(records, tokenizer, max_length=64, overlong="truncate")
    assert len(data) == 1 and data[0].source == "t:2"
    assert data.skipped == {"no_loss_tokens": 1} and data.truncated == 0
    assert all(e.num_loss_tokens > 0 for e in data)


def test_no_usable_examples_is_an_error(tokenizer):
    with pytest.raises(DataError, match=r"no usable examples \(too_long 1\)"):
        tokenize_records([Record("t:1", text=LONG)], tokenizer, max_length=8, overlong="drop", name="d")


def test_bad_policy_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="truncate"):
        tokenize_records([Record("t:1", text="x")], tokenizer, overlong="cut")


def _write_chat_file(path, n):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": _chat(f"question {i}", f"answer {i}").messages}) + "\n")
    return path


def test_val_fraction_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    path = _write_chat_file(tmp_path / "d.jsonl", 50)
    a = load_data(path, tokenizer=tokenizer, val_fraction=0.2, seed=3)
    b = load_data(path, tokenizer=tokenizer, val_fraction=0.2, seed=3)
    c = load_data(path, tokenizer=tokenizer, val_fraction=0.2, seed=4)
    sources = lambda d: [e.source for e in d]  # noqa: E731
    assert (len(a.train), len(a.val)) == (40, 10)
    assert sources(a.val) == sources(b.val) and sources(a.val) != sources(c.val)
    assert not set(sources(a.train)) & set(sources(a.val))


def test_val_file_and_bad_records_counted_per_split(tokenizer, tmp_path):
    train = _write_chat_file(tmp_path / "train.jsonl", 5)
    with train.open("a") as f:
        f.write("not json\n")
    val = _write_chat_file(tmp_path / "val.jsonl", 3)
    data = load_data(train, tokenizer=tokenizer, val=val, skip_bad_records=True)
    assert (len(data.train), len(data.val)) == (5, 3)
    assert data.train.skipped == {"invalid_json": 1} and data.val.skipped == {}
    with pytest.raises(DataError, match=r"train\.jsonl:6: invalid JSON"):
        load_data(train, tokenizer=tokenizer, val=val)
    with pytest.raises(ConfigError, match="not both"):
        load_data(train, tokenizer=tokenizer, val=val, val_fraction=0.1)


def test_builtin_task_api_has_its_fixed_split(tokenizer):
    data = load_data("task-api", tokenizer=tokenizer, max_length=256)
    assert (len(data.train), len(data.val)) == (2000, 200)
    assert not data.train.skipped and data.train.truncated == 0
    assert max(data.train.lengths) <= 128  # short enough for the CPU demo
    with pytest.raises(ConfigError, match="fixed held-out split"):
        load_data("task-api", tokenizer=tokenizer, val_fraction=0.1)
