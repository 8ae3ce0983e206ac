"""Record shapes the field uses (Alpaca, ShareGPT) beside lorakit's own, chosen by their fields or
by --format, and columns of other names mapped with --field: each gives the tokens and labels of
its JSONL equivalent in lorakit's own shapes."""

import json

import pytest

from lorakit.data import load_data, parse_record
from lorakit.data.records import RecordError, data_field_map
from lorakit.errors import ConfigError, DataError
from lorakit.train import TrainConfig

QUESTION, ANSWER = "What is the capital of France?", "Paris."


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _examples(path, tokenizer, **kwargs):
    splits = load_data(path, tokenizer=tokenizer, max_length=None, **kwargs)
    return [(e.input_ids, e.labels) for e in splits.train.examples]


def test_alpaca_records_read_as_the_chat_they_describe(tokenizer, tmp_path):
    alpaca = _write(tmp_path / "alpaca.jsonl", [
        {"instruction": QUESTION, "input": "", "output": ANSWER},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "system": "Be brief."},
    ])
    chat = _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Translate to French.\n\nGood morning"},
                      {"role": "assistant", "content": "Bonjour"}]},
    ])
    assert _examples(alpaca, tokenizer) == _examples(chat, tokenizer)


def test_sharegpt_conversations_read_as_messages(tokenizer, tmp_path):
    sharegpt = _write(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER},
        {"from": "human", "value": "And Spain?"}, {"from": "gpt", "value": "Madrid."}]}])
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."}]}])
    assert _examples(sharegpt, tokenizer) == _examples(chat, tokenizer)


def test_columns_of_other_names_are_mapped_with_fields(tokenizer, tmp_path):
    mine = _write(tmp_path / "qa.jsonl", [{"question": QUESTION, "answer": ANSWER, "id": 7}])
    ours = _write(tmp_path / "pc.jsonl", [{"prompt": QUESTION, "completion": ANSWER}])
    mapped = _examples(mine, tokenizer, fields=data_field_map(["prompt=question", "completion=answer"]))
    assert mapped == _examples(ours, tokenizer)
    with pytest.raises(DataError, match=r'qa.jsonl:1: no column "query" for field "prompt"'):
        load_data(mine, tokenizer=tokenizer, fields={"prompt": "query", "completion": "answer"})


def test_an_ambiguous_record_names_its_fields_and_the_way_out_and_format_settles_it(tokenizer, tmp_path):
    both = _write(tmp_path / "both.jsonl", [{"text": "hello there", "instruction": "Greet.", "output": "Hi!"}])
    with pytest.raises(DataError, match=r"both.jsonl:1: the fields instruction, output, text fit the shapes text and "
                                        r"alpaca; give --format SHAPE"):
        load_data(both, tokenizer=tokenizer)
    as_text = _examples(both, tokenizer, record_format="text")
    assert as_text == _examples(_write(tmp_path / "t.jsonl", [{"text": "hello there"}]), tokenizer)


def test_an_unknown_shape_lists_the_fields_found_and_the_shapes_accepted():
    with pytest.raises(RecordError) as err:
        parse_record({"question": "q", "reply": "a"}, "f:1")
    assert err.value.reason == "missing_field"
    assert "keys: question, reply" in err.value.detail and "ShareGPT" in err.value.detail
    with pytest.raises(RecordError, match="from 'bot'"):
        parse_record({"conversations": [{"from": "bot", "value": "x"}]}, "f:1")
    with pytest.raises(RecordError, match='"output" is empty'):
        parse_record({"instruction": "q", "output": " "}, "f:1")


def test_the_training_options_check_format_and_fields(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="data_format='csv'"):
        TrainConfig.from_settings(data="x.jsonl", data_format="csv")
    with pytest.raises(ConfigError, match="data_fields=.*FIELD=COLUMN"):
        TrainConfig.from_settings(data="x.jsonl", data_fields=["question"])
    with pytest.raises(ConfigError, match="data_fields=.*each field once"):
        TrainConfig.from_settings(data="x.jsonl", data_fields=["prompt=a", "prompt=b"])
    with pytest.raises(ConfigError, match="describe supervised records"):
        TrainConfig.from_settings(data="x.jsonl", method="dpo", data_format="alpaca")
