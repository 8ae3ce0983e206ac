"""task-api preference pairs: deterministic, always wrong, of the kind they claim, balanced, DPO-shaped."""

import json
import random
from collections import Counter

import pytest

from lorakit.data.task_api import (
    PREFERENCE_KINDS,
    SYSTEM,
    PreferencePair,
    generate,
    generate_preferences,
    parse_answer,
    preference_pairs,
    prompt_messages,
    rejected_answer,
    score,
)
from lorakit.data.task_api import vocab
from lorakit.data.task_api.generate import FIELDS, format_task


@pytest.fixture(scope="module")
def pairs():
    return generate_preferences()


def _others_equal(got, task, field):
    return {k: v for k, v in got.items() if k != field} == {k: v for k, v in task.items() if k != field}


def test_deterministic(pairs):
    train, val = pairs
    again_train, again_val = generate_preferences()
    assert [(p.rejected, p.kind) for p in again_train] == [(p.rejected, p.kind) for p in train]
    assert [(p.rejected, p.kind) for p in again_val] == [(p.rejected, p.kind) for p in val]
    assert again_train == train and again_val == val
    # another seed gives other pairs; the global random state plays no part
    assert [p.rejected for p in preference_pairs([p.example for p in train], seed=1)] != [p.rejected for p in train]
    random.seed(0)
    first = preference_pairs([p.example for p in train[:50]])
    random.seed(1)
    assert preference_pairs([p.example for p in train[:50]]) == first == train[:50]


def test_sizes_and_built_from_the_splits(pairs):
    train, val = pairs
    splits = generate()
    assert (len(train), len(val)) == (2000, 200)
    assert [p.example for p in train] == splits.train
    assert [p.example for p in val] == splits.val  # held-out pairs come from the held-out examples
    assert [p.example for p in generate_preferences(n_train=100, n_val=20)[1]] == generate(100, 20).val
    assert all(p.chosen == p.example.answer for p in train + val)


def test_every_rejected_is_wrong(pairs):
    train, val = pairs
    for pair in train + val:
        assert pair.kind in PREFERENCE_KINDS
        assert pair.rejected != pair.chosen
        assert score([pair.rejected], [pair.example.task]).exact == 0.0, (pair.kind, pair.rejected)
        assert score([pair.chosen], [pair.example.task]).exact == 1.0
    scored = score([p.rejected for p in train], [p.example.task for p in train])
    assert scored.exact == 0.0


def test_kinds_present_and_balanced(pairs):
    train, val = pairs
    counts = Counter(p.kind for p in train)
    assert set(counts) == set(PREFERENCE_KINDS)
    for kind in PREFERENCE_KINDS:
        assert 0.12 * len(train) <= counts[kind] <= 0.22 * len(train), counts
    assert set(Counter(p.kind for p in val)) == set(PREFERENCE_KINDS)


def test_each_rejected_is_of_its_kind(pairs):
    train, val = pairs
    seen = Counter()
    for pair in train + val:
        task, rejected = pair.example.task, pair.rejected
        got = parse_answer(rejected)
        if pair.kind == "malformed":
            assert got is None or set(got) != set(FIELDS), rejected
            seen["unparseable" if got is None else "renamed key"] += 1
            continue
        if pair.kind == "chatty":  # no JSON object at all, but about this task
            assert got is None and task["title"].casefold() in rejected.casefold(), rejected
            seen["chatty"] += 1
            continue
        # one field wrong, still the schema's compact JSON
        assert got is not None and rejected == format_task(got) and list(got) == list(FIELDS)
        field = pair.kind
        assert _others_equal(got, task, field), (field, rejected)
        assert got[field] != task[field]
        if field == "priority":
            assert type(got["priority"]) is int and got["priority"] in (1, 2, 3, 4)
        elif field == "labels":
            if task["labels"]:
                assert len(got["labels"]) == len(task["labels"]) - 1 and set(got["labels"]) < set(task["labels"])
                seen["label dropped"] += 1
            else:
                assert len(got["labels"]) == 1 and got["labels"][0] in vocab.LABELS
                seen["label added"] += 1
        elif field == "due_string":
            if task["due_string"] is None:
                assert isinstance(got["due_string"], str) and got["due_string"]
                seen["date invented"] += 1
            else:
                seen["date lost" if got["due_string"] is None else "date changed"] += 1
        elif field == "title":
            assert isinstance(got["title"], str) and got["title"] and got["title"][0].isupper()
    for variant in ("unparseable", "renamed key", "label dropped", "label added", "date invented", "date lost",
                    "date changed"):
        assert seen[variant] > 10, seen


def test_variants_look_like_real_mistakes(pairs):
    train, _ = pairs
    by_kind = {kind: [p for p in train if p.kind == kind] for kind in PREFERENCE_KINDS}
    titles = [(p.example.task["title"], json.loads(p.rejected)["title"]) for p in by_kind["title"]]
    assert any(wrong.endswith(right[0].lower() + right[1:]) for right, wrong in titles)  # lead kept
    assert any(right.startswith(wrong) and len(wrong) < len(right) for right, wrong in titles)  # cut short
    malformed = [p.rejected for p in by_kind["malformed"]]
    assert any('"due":' in r for r in malformed)  # "due" for "due_string"
    assert any(r.endswith(",}") for r in malformed) and any("'title'" in r for r in malformed)
    assert any(not r.endswith("}") and not r.endswith("```") for r in malformed)  # missing closing brace
    chatty = [p.rejected for p in by_kind["chatty"]]
    assert any(r.startswith("Sure!") for r in chatty) and any(r.startswith("Task: ") for r in chatty)
    assert any("```json" in r and '"tags"' in r for r in chatty)
    # an urgent request answered with the default priority 1
    urgent = [p for p in by_kind["priority"] if p.example.task["priority"] == 4]
    assert any(json.loads(p.rejected)["priority"] == 1 for p in urgent)


def test_rejected_answer_applies_to_the_example():
    rng = random.Random(0)
    examples = generate(n_train=50, n_val=0).train
    bare = next(e for e in examples if not e.task["labels"] and e.task["due_string"] is None)
    kinds = set()
    for _ in range(200):
        wrong, kind = rejected_answer(bare, rng)
        kinds.add(kind)
        assert wrong != bare.answer and score([wrong], [bare.task]).exact == 0.0
        if kind == "labels":  # no label to drop: one is added
            assert len(json.loads(wrong)["labels"]) == 1
    assert kinds == set(PREFERENCE_KINDS)


def test_to_record_shape(pairs):
    pair = pairs[1][0]
    assert isinstance(pair, PreferencePair)
    record = pair.to_record()
    assert set(record) == {"messages", "chosen", "rejected"}
    assert record["messages"] == prompt_messages(pair.example.request)
    assert [m["role"] for m in record["messages"]] == ["system", "user"]
    assert record["messages"][0]["content"] == SYSTEM
    assert record["chosen"] == pair.example.answer and record["rejected"] == pair.rejected
    assert json.loads(json.dumps(record)) == record
