"""The task-api scorer on hand-made answers."""

import json

import pytest

from lorakit.data.task_api import parse_answer, score
from lorakit.errors import DataError

REF = {"title": "Call the dentist", "due_string": "next Tuesday", "priority": 4, "labels": ["health", "family"]}
NO_DATE = {"title": "Buy milk", "due_string": None, "priority": 1, "labels": []}


def _json(**changes):
    return json.dumps({**REF, **changes})


def test_exact_and_per_field():
    predictions = [
        _json(),  # right
        _json(labels=["family", "health"]),  # label order does not matter: right
        _json(priority="4"),  # a string priority is wrong
        _json(title="call the dentist", due_string="Tuesday"),  # two fields wrong
        _json(extra="x"),  # fields right, but not the same object
    ]
    result = score(predictions, [REF] * 5)
    assert result.n == 5 and result.unparseable == 0
    assert result.exact == pytest.approx(2 / 5)
    assert (result.title, result.due_string) == (pytest.approx(4 / 5), pytest.approx(4 / 5))
    assert result.priority == pytest.approx(4 / 5) and result.labels == 1.0


def test_missing_due_string_equals_null_and_references_may_be_json():
    prediction = json.dumps({"title": "Buy milk", "priority": 1, "labels": []})
    result = score([prediction], [json.dumps(NO_DATE)])
    assert result.exact == 1.0 and result.due_string == 1.0


def test_unparseable_answers_are_wrong_everywhere():
    predictions = ["```json\n" + _json() + "\n```", "Sure! Here is the task.", "[1, 2]", ""]
    result = score(predictions, [REF] * 4)
    assert result.unparseable == 4
    assert result.exact == result.title == result.due_string == result.priority == result.labels == 0.0
    assert "unparseable 4" in result.summary()


def test_parse_answer_allows_surrounding_whitespace_only():
    assert parse_answer("  " + _json() + "\n") == REF
    assert parse_answer(_json() + " trailing") is None


def test_lengths_must_match_and_empty_is_zero():
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        score(["{}", "{}"], [REF])
    assert score([], []).exact == 0.0
