"""Preference records: the three shapes, the strict per-line checks, tokenization, the built-in set."""

import json

import pytest

from lorakit.data import load_preferences, read_preferences, tokenize_preferences
from lorakit.data import PairCollator, PairStreamCollator
from lorakit.data.preference import parse_preference
from lorakit.data.records import RecordError
from lorakit.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "Capital of France?"}


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_the_three_shapes_are_read():
    text = parse_preference({"prompt": "Q: 2+2?", "chosen": "4", "rejected": "5"}, "f:1")
    assert (text.kind, text.prompt, text.chosen, text.rejected) == ("text", "Q: 2+2?", "4", "5")
    chat = parse_preference({"messages": [SYSTEM, USER], "chosen": "Paris", "rejected": "Lyon"}, "f:2")
    assert chat.kind == "chat" and chat.messages == (SYSTEM, USER) and chat.chosen == "Paris"
    trl = parse_preference({"prompt": [USER], "chosen": [{"role": "assistant", "content": "Paris"}],
                            "rejected": {"role": "assistant", "content": "Lyon"}}, "f:3")
    assert trl.messages == (USER,) and (trl.chosen, trl.rejected) == ("Paris", "Lyon")
    assert chat.chosen_record() == {"messages": [SYSTEM, USER, {"role": "assistant", "content": "Paris"}]}


@pytest.mark.parametrize("record,reason", [
    ({"prompt": "q", "chosen": "a"}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "same_answers"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "wrong_type"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_text"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_text"),
    ({"messages": [USER], "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "unknown_role"),
    ({"messages": [USER], "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"}, "wrong_type"),
    ({"messages": [USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, "empty_messages"),
    ({"messages": [USER], "prompt": "q", "chosen": "a", "rejected": "b"}, "wrong_type"),
    ([1, 2], "wrong_type"),
])
def test_a_bad_record_is_refused_with_its_reason(record, reason):
    with pytest.raises(RecordError) as err:
        parse_preference(record, "f:1")
    assert err.value.reason == reason


def test_a_bad_line_stops_at_its_file_and_line_or_is_skipped_and_counted(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "prefs.jsonl", [good, "{not json", good, {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: invalid JSON .*--skip-bad-records"):
        read_preferences(path)
    records, skipped = read_preferences(path, skip_bad_records=True)
    assert len(records) == 2 and dict(skipped) == {"invalid_json": 1, "same_answers": 1}
    with pytest.raises(DataError, match="not found"):
        read_preferences(tmp_path / "missing.jsonl")


def test_a_chat_pair_tokenizes_to_the_supervised_examples_tokens(tokenizer):
    record = parse_preference({"messages": [SYSTEM, USER], "chosen": "Paris.", "rejected": "It is Lyon."}, "f:1")
    example = tokenize_preferences([record], tokenizer, max_length=None).examples[0]
    sequence = example.prompt_ids + example.chosen_ids  # what SFT trains on, to the end-of-turn token
    assert example.scored.input_ids[:len(sequence)] == sequence
    assert tokenizer.decode(example.scored.input_ids[len(sequence):]).strip() == ""
    assert tokenizer.decode(example.chosen_ids) == "Paris.<|im_end|>"
    assert tokenizer.decode(example.rejected_ids) == "It is Lyon.<|im_end|>"
    assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")


def test_a_text_pair_ends_each_answer_with_eos(tokenizer):
    record = parse_preference({"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}, "f:1")
    example = tokenize_preferences([record], tokenizer).examples[0]
    assert example.chosen_ids[-1] == example.rejected_ids[-1] == tokenizer.eos_token_id
    assert example.tokens == 2 * len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)


def test_overlong_pairs_are_truncated_dropped_or_refused(tokenizer):
    long = parse_preference({"prompt": "Q:", "chosen": " one two three four five six", "rejected": " no"}, "f:1")
    short = parse_preference({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, "f:2")
    kept = tokenize_preferences([long, short], tokenizer, max_length=5)
    assert kept.truncated == 1 and all(len(e.prompt_ids) + len(e.chosen_ids) <= 5 for e in kept.examples)
    dropped = tokenize_preferences([long, short], tokenizer, max_length=5, overlong="drop")
    assert len(dropped) == 1 and dropped.skipped == {"too_long": 1}
    with pytest.raises(DataError, match="f:1: .*more than max_length=5"):
        tokenize_preferences([long, short], tokenizer, max_length=5, overlong="error")
    with pytest.raises(DataError, match="no usable preference pairs"):
        tokenize_preferences([long], tokenizer, max_length=2)


def test_the_built_in_set_loads_with_its_held_out_split(tokenizer):
    splits = load_preferences("task-api-prefs", tokenizer=tokenizer)
    assert len(splits.train) == 2000 and len(splits.val) == 200
    assert splits.val.examples[0].scored is not None
    with pytest.raises(ConfigError, match="task-api-prefs"):
        load_preferences("task-api", tokenizer=tokenizer)


def test_the_stream_holds_each_prompt_once_and_the_padded_batch_twice(tokenizer):
    splits = load_preferences("task-api-prefs", tokenizer=tokenizer)
    pairs = splits.val.examples[:4]
    padded, stream = PairCollator(tokenizer.pad_token_id)(pairs), PairStreamCollator()(pairs)
    assert int(padded["attention_mask"].sum()) == int(stream["example_tokens"]) == sum(p.tokens for p in pairs)
    assert stream["input_ids"].shape[1] == sum(len(p) for p in pairs) + 2 * len(pairs) - len(pairs)
    for batch in (padded, stream):
        labels = batch["labels"][:, 1:]
        assert int((labels != -100).sum()) == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
