"""Data in the shapes and files the field uses: each file format gives exactly the tokens and labels of
its JSONL equivalent; bad files give errors that name the line or row; data is read one record at a
time (a file larger than memory trains)."""

from __future__ import annotations

import csv
import json
import sys
import tracemalloc

import numpy as np
import pytest

from lorakit.data import load_data, load_preferences
from lorakit.data.sources import rows
from lorakit.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

SHAPES = {
    "text": [{"text": f"Note {i}: the meeting moved to room {i + 3}."} for i in range(5)],
    "completion": [{"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}"} for i in range(5)],
    "chat": [{"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": f"Capital of country {i}?"},
                           {"role": "assistant", "content": f"City {i}, \"quoted\", with a comma."}]}
             for i in range(5)],
    "alpaca": [{"instruction": f"Translate {i} to words.", "input": "" if i % 2 else "in English",
                "output": f"number {i}"} for i in range(5)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}!"},
                                    {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye\nnow"}]}
                 for i in range(5)],
}


def write(path, records, fmt):
    """``records`` as a file of format ``fmt``; returns the path (a directory for datasets)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=2))
    elif fmt in ("csv", "tsv"):
        columns = list(dict.fromkeys(k for r in records for k in r))
        with path.open("w", newline="") as f:
            writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            writer.writerow(columns)
            for r in records:
                writer.writerow([json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "") for c in columns])
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "datasets":
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def tokens(split):
    return [(e.input_ids, e.labels) for e in split.examples]


@pytest.mark.parametrize("fmt", ["json", "csv", "tsv", "parquet", "datasets"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_format_gives_the_tokens_and_labels_of_its_jsonl_equivalent(tmp_path, tokenizer, fmt, shape):
    records = SHAPES[shape]
    reference = load_data(write(tmp_path / "ref.jsonl", records, "jsonl"), tokenizer=tokenizer)
    other = load_data(write(tmp_path / f"data.{fmt}" if fmt != "datasets" else tmp_path / "saved", records, fmt),
                      tokenizer=tokenizer)
    assert len(other.train) == len(records)
    assert tokens(other.train) == tokens(reference.train)
    assert other.train.profile["shapes"] == {shape: len(records)}


def test_a_dataset_in_the_local_cache_is_read_by_name_offline(tmp_path, tokenizer, monkeypatch):
    """What ``load_dataset`` leaves in the cache, read by its hub name without any network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    records = SHAPES["completion"]
    where = tmp_path / "acme___arith" / "default" / "0.0.0" / "0123abcd"
    where.mkdir(parents=True)
    for split, part in (("train", records[:4]), ("test", records[4:])):
        with datasets.arrow_writer.ArrowWriter(path=str(where / f"arith-{split}.arrow")) as writer:
            for r in part:
                writer.write(r)
            writer.finalize()
    info = datasets.DatasetInfo(features=datasets.Dataset.from_list(records).features, dataset_name="arith",
                                config_name="default")
    info.splits = datasets.SplitDict(dataset_name="arith")
    for split, n in (("train", 4), ("test", 1)):
        info.splits.add(datasets.SplitInfo(split, num_examples=n, dataset_name="arith"))
    info.write_to_directory(str(where))

    splits = load_data("acme/arith", tokenizer=tokenizer, val="acme/arith")  # held out: its test split
    reference = load_data(write(tmp_path / "ref.jsonl", records, "jsonl"), tokenizer=tokenizer)
    assert tokens(splits.train) + tokens(splits.val) == tokens(reference.train)
    assert load_data("acme/arith:test", tokenizer=tokenizer).train.examples[0].source == "acme/arith:test:row 1"
    with pytest.raises(DataError, match=r"acme/missing: not a file.*never downloads"):
        load_data("acme/missing", tokenizer=tokenizer)


def test_a_saved_dataset_dict_gives_train_and_its_validation_split(tmp_path, tokenizer):
    records = SHAPES["text"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:3]),
                          "validation": datasets.Dataset.from_list(records[3:])}).save_to_disk(str(tmp_path / "dd"))
    splits = load_data(tmp_path / "dd", tokenizer=tokenizer, val=tmp_path / "dd")
    assert (len(splits.train), len(splits.val)) == (3, 2)
    assert len(load_data(f"{tmp_path / 'dd'}:validation", tokenizer=tokenizer).train) == 2
    with pytest.raises(DataError, match=r"no split nope.*its splits: train, validation"):
        load_data(f"{tmp_path / 'dd'}:nope", tokenizer=tokenizer)


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_val_fraction_and_skipped_records_work_for_every_format(tmp_path, tokenizer, fmt):
    records = SHAPES["completion"] * 4 + [{"prompt": "no answer"}]
    path = write(tmp_path / f"d.{fmt}", records, fmt)
    with pytest.raises(DataError, match=r"d\.%s:(row )?\d+: .*completion" % fmt):
        load_data(path, tokenizer=tokenizer, val_fraction=0.25)
    splits = load_data(path, tokenizer=tokenizer, val_fraction=0.25, skip_bad_records=True)
    reference = load_data(write(tmp_path / "r.jsonl", records, "jsonl"), tokenizer=tokenizer, val_fraction=0.25,
                          skip_bad_records=True)
    assert (len(splits.train), len(splits.val)) == (15, 5)
    assert tokens(splits.train) == tokens(reference.train) and tokens(splits.val) == tokens(reference.val)
    assert splits.train.skipped == {"missing_field": 1}


def test_preference_pairs_come_from_any_format_too(tmp_path, tokenizer):
    pairs = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(4)]
    reference = load_preferences(write(tmp_path / "p.jsonl", pairs, "jsonl"), tokenizer=tokenizer)
    for fmt in ("csv", "parquet", "json"):
        other = load_preferences(write(tmp_path / f"p.{fmt}", pairs, fmt), tokenizer=tokenizer)
        assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in other.train.examples] == \
            [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in reference.train.examples]


@pytest.mark.parametrize("name, content, error", [
    ("stray.csv", 'prompt,completion\nfine,ok\n"a"b,c\n', r"stray\.csv:3: .*quote a cell"),
    ("cells.tsv", "prompt\tcompletion\nq\ta\textra\n", r"cells\.tsv:2: the row has 3 cells, the header 2"),
    ("empty.csv", "", r"empty\.csv: the file is empty; a CSV file needs a header row"),
    ("header.csv", "prompt,prompt\nx,y\n", r"header\.csv:1: the header row must name each column once"),
    ("types.json", '[{"prompt": "a", "completion": "b"},\n 7]', r"types\.json:2: the item is a number, not an object"),
    ("broken.json", '[{"prompt": "a", "completion": "b"},\n {"prompt": ]', r"broken\.json:2: invalid JSON"),
    ("empty.json", "  ", r"empty\.json: no usable examples \(no records\)"),
    ("open.json", '[{"text": "a"},', r"open\.json:1: the file ends inside the array"),
    ("wrongtype.json", '[{"prompt": "a", "completion": 5}]', r'wrongtype\.json:1: field "completion" is a number'),
    ("chat.csv", 'messages\n"[{""role"": ""user""}"\n', r'chat\.csv:2: the "messages" cell is not JSON'),
    ("notes.txt", "hello", r"notes\.txt: \.txt is not a data format"),
])
def test_bad_files_name_the_line_or_row(tmp_path, tokenizer, name, content, error):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=error):
        load_data(tmp_path / name, tokenizer=tokenizer)


def test_a_parquet_file_without_a_column_names_the_row_and_the_columns(tmp_path, tokenizer):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["1+1?", "2+2?"], "answer": ["2", "4"]}), path)
    with pytest.raises(DataError, match=r'qa\.parquet:row 1: no "text".*\(keys: answer, question\)'):
        load_data(path, tokenizer=tokenizer)
    with pytest.raises(DataError, match=r'qa\.parquet:row 1: no column "reply" for field "completion"'):
        load_data(path, tokenizer=tokenizer, fields={"prompt": "question", "completion": "reply"})
    mapped = load_data(path, tokenizer=tokenizer, fields={"prompt": "question", "completion": "answer"})
    reference = load_data(write(tmp_path / "r.jsonl", [{"prompt": "1+1?", "completion": "2"},
                                                       {"prompt": "2+2?", "completion": "4"}], "jsonl"),
                          tokenizer=tokenizer)
    assert tokens(mapped.train) == tokens(reference.train)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_data(bad, tokenizer=tokenizer)


def test_rows_are_read_one_at_a_time(tmp_path):
    """A JSON array, a CSV and a Parquet file are not read whole: the first row comes before the
    reader has held more than a small part of the file."""
    random = np.random.default_rng(0)
    records = [{"text": random.bytes(1000).hex()} for _ in range(3000)]  # ~6 MB that does not compress away
    for fmt in ("json", "csv", "parquet", "jsonl"):
        path = write(tmp_path / f"big.{fmt}", records, fmt)
        tracemalloc.start()
        try:
            reader = rows(path)
            first = next(reader)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert first[1] == records[0]
        assert peak < path.stat().st_size / 3, (fmt, peak, path.stat().st_size)


def test_a_file_larger_than_the_memory_it_may_use_trains(tmp_path, tokenizer):
    """Tokenizing keeps the examples on disk: Python holds a fraction of the file while loading it,
    where reading it into records and token lists would hold several times its size."""
    path = write(tmp_path / "big.jsonl", [{"prompt": f"Q{i}: " + "word " * 300, "completion": f" A{i}"}
                                          for i in range(2500)], "jsonl")  # ~4 MB, ~0.8 M tokens
    tracemalloc.start()
    try:
        splits = load_data(path, tokenizer=tokenizer, val_fraction=0.1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (len(splits.train), len(splits.val)) == (2250, 250)
    assert peak < path.stat().st_size / 4, (peak, path.stat().st_size)
    example = splits.train.examples[17]
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.labels[-1] == tokenizer.eos_token_id


def test_the_data_summary_counts_shapes_lengths_truncation_and_labels(tmp_path, tokenizer):
    records = SHAPES["completion"] + SHAPES["alpaca"] + [{"text": "long " * 200}, {"prompt": "x", "completion": ""}]
    splits = load_data(write(tmp_path / "mixed.jsonl", records, "jsonl"), tokenizer=tokenizer, max_length=64,
                       skip_bad_records=True)
    train = splits.train
    lengths = sorted(len(e) for e in load_data(write(tmp_path / "m2.jsonl", records[:-1], "jsonl"),
                                               tokenizer=tokenizer, max_length=None).train.examples)
    assert train.profile["shapes"] == {"completion": 5, "alpaca": 5, "text": 1}
    assert train.profile["lengths"] == [lengths[5], lengths[10], lengths[-1]]  # nearest rank of 11
    assert train.truncated == 1 and train.skipped == {"empty_text": 1}
    assert train.num_loss_tokens == sum(e.num_loss_tokens for e in train.examples)
    text = "\n".join(train.describe())
    assert "11 records read (alpaca 5, completion 5, text 1), 11 examples kept" in text
    assert f"p50 {lengths[5]}, p95 {lengths[10]}, max {lengths[-1]} (max_length 64)" in text
    assert "truncated 1; left out 1 (empty_text 1)" in text
    assert f"label tokens (the loss covers): {train.num_loss_tokens:,} of {train.num_tokens:,}" in text


def test_a_missing_reader_package_names_the_extra_to_install(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "d.parquet", SHAPES["text"], "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"Parquet files needs the pyarrow package: pip install 'lorakit\[data\]'"):
        load_data(path, tokenizer=tokenizer)
