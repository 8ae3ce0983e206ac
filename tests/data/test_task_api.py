"""The built-in task-api dataset: deterministic, sized, disjoint, varied, faithful to its requests."""

import json
from collections import Counter

import pytest

from lorakit.data import read_jsonl
from lorakit.data.task_api import SYSTEM, export_jsonl, generate, prompt_messages


@pytest.fixture(scope="module")
def splits():
    return generate()


def _key(request):
    return " ".join(request.casefold().split())


def test_deterministic(splits):
    again = generate()
    assert [(e.request, e.answer) for e in again.train] == [(e.request, e.answer) for e in splits.train]
    assert [(e.request, e.answer) for e in again.val] == [(e.request, e.answer) for e in splits.val]
    assert generate(seed=1).train[0].request != splits.train[0].request


def test_sizes_and_fixed_held_out(splits):
    assert (len(splits.train), len(splits.val)) == (2000, 200)
    smaller = generate(n_train=300)
    assert [e.request for e in smaller.val] == [e.request for e in splits.val]  # independent of n_train


def test_no_request_repeats_within_or_across_splits(splits):
    train = [_key(e.request) for e in splits.train]
    val = [_key(e.request) for e in splits.val]
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)


def test_variety(splits):
    examples = splits.train
    n = len(examples)
    no_date = sum(e.task["due_string"] is None for e in examples)
    several_labels = sum(len(e.task["labels"]) >= 2 for e in examples)
    priority_said = sum(e.priority_said for e in examples)
    assert 0.2 * n < no_date < 0.45 * n
    assert several_labels > 0.15 * n
    assert 0.4 * n < priority_said < 0.7 * n
    assert Counter(e.task["priority"] for e in examples).keys() == {1, 2, 3, 4}
    assert sum(e.request.startswith(("hey so um", "Hey so um")) for e in examples) > 20
    assert sum(e.request.endswith(("thanks!", "if you can")) for e in examples) > 100
    assert len({e.task["title"] for e in examples}) > 120
    # a date word inside the title is not a due date
    assert any("Friday" in e.task["title"] and e.task["due_string"] is None for e in examples)
    # unspecified priority is the fixed default
    assert all(e.task["priority"] == 1 for e in examples if not e.priority_said)


def test_answers_are_faithful_to_requests(splits):
    for e in splits.train + splits.val:
        task = json.loads(e.answer)
        assert list(task) == ["title", "due_string", "priority", "labels"]
        assert e.answer == json.dumps(task, separators=(",", ":"))  # compact
        title = task["title"]
        assert title[0].isupper() and (title[0].lower() + title[1:] in e.request or title in e.request)
        if task["due_string"] is not None:
            assert task["due_string"] in e.request  # exactly as said
        assert all(label in e.request for label in task["labels"])
        assert task["priority"] in (1, 2, 3, 4)


def test_messages_and_export_round_trip(splits, tmp_path):
    example = splits.val[0]
    assert example.messages[:2] == prompt_messages(example.request)
    assert example.messages[0] == {"role": "system", "content": SYSTEM}
    assert example.messages[2] == {"role": "assistant", "content": example.answer}
    path = export_jsonl(tmp_path / "val.jsonl", splits.val)
    records, skipped = read_jsonl(path)
    assert not skipped and [list(r.messages) for r in records] == [e.messages for e in splits.val]
