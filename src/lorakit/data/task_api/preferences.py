"""Preference pairs for the ``task-api`` dataset: the right task JSON against a realistic wrong one.

DPO-style training needs, for each prompt, a *chosen* answer and a *rejected* one. Here the
chosen answer is always the example's reference (``TaskExample.answer``) and the rejected one is
the kind of mistake a small model makes on this task, one field wrong at a time so the pair
teaches exactly that field:

- ``priority``: another priority: the default 1 when the request said one, Todoist's scale read
  upside down (4 for "low"), or a neighbouring level;
- ``labels``: one label dropped, or an unrequested label from ``vocab.LABELS`` added when the
  task has none;
- ``due_string``: the date lost (``null``), another date phrase from the vocabulary, the time
  dropped or the preposition kept ("by Friday"), or a date invented (often a day named in the
  title) when there was none;
- ``title``: the request's lead kept ("Remind me to call the dentist"), the object cut short
  ("Buy a birthday card" for "... for Anna") or stripped of its article ("Call dentist"), or the
  date pasted into the title;
- ``malformed``: not the schema's JSON: a missing closing brace, single quotes, a trailing comma,
  a code fence, or a key renamed ("due" for "due_string");
- ``chatty``: no JSON object at all, the way an untuned chat model answers the request: a friendly
  sentence ("Sure! I've added ..."), the task restated as lines ("Task: ... Due: ..."), or
  pretty-printed JSON with keys of its own inside a code fence and an introduction.

The kind is drawn per example from ``random.Random`` seeded by a fixed constant and the example's
index (never the global random state), so the same call always returns the same pairs. Every
kind applies to every example (each has a fallback), so the kinds come out about equally often.
Every rejected answer differs from the chosen one and is not an exact match under ``score``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from . import vocab
from .generate import FIELDS, TaskExample, format_task, generate, prompt_messages

__all__ = [
    "PREFERENCE_KINDS", "PREFS_SEED", "PreferencePair", "rejected_answer", "preference_pairs",
    "generate_preferences",
]

PREFERENCE_KINDS = ("priority", "labels", "due_string", "title", "malformed", "chatty")
PREFS_SEED = 4242
_INDEX_STRIDE = 1_000_003  # seed * stride + index: distinct per (seed, index) below a million examples

# Every due_string the vocabulary can produce without a time or a month day: alternatives to a right one.
_DATE_PHRASES = sorted(
    {phrase for phrase, _ in vocab.PLAIN_DATES}
    | {form.format(day=day) for form in vocab.DAY_FORMS for day in vocab.DAYS}
    | {vocab.END_OF_MONTH[0]}
)
_PREPOSITIONS = ("by the ", "at the ", "on ", "by ")
_TIME = re.compile(r" at (?:\d|noon)")
# Where a title's object can be cut short: before its last trailing phrase ("... for Anna").
_CUT = re.compile(r" (?:for|about|from|to|at|with|of) ")
_ARTICLE = re.compile(r" (?:the|a|an|my) ")  # dropped: "Call dentist" for "Call the dentist"
# Renamed keys a model invents instead of the schema's.
_WRONG_KEYS = (("due_string", "due"), ("due_string", "due"), ("due_string", "date"), ("labels", "tags"),
               ("title", "task"))


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with its right answer (``chosen``) and a wrong one (``rejected``) of ``kind``."""

    example: TaskExample
    rejected: str  # the wrong answer text
    kind: str  # one of PREFERENCE_KINDS

    @property
    def chosen(self) -> str:
        return self.example.answer

    def to_record(self) -> dict:
        """``{"messages": [system, user], "chosen": ..., "rejected": ...}``: a DPO record."""
        return {"messages": prompt_messages(self.example.request), "chosen": self.chosen,
                "rejected": self.rejected}


def _with(task: dict, **changes) -> str:
    """The compact JSON of ``task`` with some fields replaced."""
    return format_task({**task, **changes})


def _wrong_priority(task: dict, rng: random.Random) -> str:
    right = task["priority"]
    # the default, the scale upside down (Todoist's p1 is priority 4), a neighbouring level
    options = [p for p in (vocab.DEFAULT_PRIORITY, 5 - right, right - 1, right + 1) if 1 <= p <= 4 and p != right]
    return _with(task, priority=rng.choice(options))


def _wrong_labels(task: dict, rng: random.Random) -> str:
    labels = list(task["labels"])
    if labels:
        del labels[rng.randrange(len(labels))]
    else:
        labels = [rng.choice(vocab.LABELS)]
    return _with(task, labels=labels)


def _wrong_due(task: dict, request: str, rng: random.Random) -> str:
    due = task["due_string"]
    if due is None:
        # a day or month named in the title taken for the due date, else any date
        in_title = [w for w in task["title"].split() if w in vocab.DAYS or w in vocab.MONTHS]
        return _with(task, due_string=rng.choice(in_title) if in_title else rng.choice(_DATE_PHRASES))
    options = ["null", "null", "other", "other"]
    if _TIME.search(due):
        options.append("time dropped")
    said = [p + due for p in _PREPOSITIONS if (p + due).casefold() in request.casefold()]
    if said:
        options.append("preposition kept")
    choice = rng.choice(options)
    if choice == "null":
        return _with(task, due_string=None)
    if choice == "time dropped":
        return _with(task, due_string=due[:_TIME.search(due).start()])
    if choice == "preposition kept":
        return _with(task, due_string=said[0])
    return _with(task, due_string=rng.choice([d for d in _DATE_PHRASES if d != due]))


def _lead(said: str, request: str, rng: random.Random) -> str:
    """``said`` with the lead the request put before it ("remind me to ..."), else with a random lead."""
    leads = [lead.format(task=said) for lead in vocab.LEADS if lead != "{task}"]
    used = [lead for lead in leads if lead.casefold() in request.casefold()]
    return max(used, key=len) if used else rng.choice(leads)


def _wrong_title(task: dict, request: str, rng: random.Random) -> str:
    title = task["title"]
    options = ["lead"]
    cuts = [m.start() for m in _CUT.finditer(title) if len(title[:m.start()].split()) >= 2]
    if cuts:
        options.append("cut")
    if _ARTICLE.search(title):
        options.append("article")
    if task["due_string"] is not None:
        options.append("date")
    choice = rng.choice(options)
    if choice == "cut":
        wrong = title[:cuts[-1]]
    elif choice == "article":
        wrong = _ARTICLE.sub(" ", title, count=1)
    elif choice == "date":
        wrong = f"{title} {task['due_string']}"
    else:
        wrong = _lead(title[0].lower() + title[1:], request, rng)
        wrong = wrong[0].upper() + wrong[1:]
    return _with(task, title=wrong)


def _malformed(task: dict, rng: random.Random) -> str:
    answer = format_task(task)
    choice = rng.choice(["brace", "quotes", "comma", "fence", "key", "key"])
    if choice == "brace":
        return answer[:-1]
    if choice == "quotes":
        return answer.replace('"', "'")
    if choice == "comma":
        return answer[:-1] + ",}"
    if choice == "fence":
        return f"```json\n{answer}\n```"
    old, new = rng.choice(_WRONG_KEYS)
    renamed = {(new if key == old else key): task[key] for key in FIELDS}
    return json.dumps(renamed, separators=(",", ":"), ensure_ascii=False)


_PRIORITY_WORDS = {4: "urgent", 3: "high", 2: "medium", 1: "low"}


def _chatty(task: dict, rng: random.Random) -> str:
    title, due, labels = task["title"], task["due_string"], task["labels"]
    when = f" for {due}" if due else ""
    choice = rng.choice(["sentence", "lines", "fenced"])
    if choice == "sentence":
        opener = rng.choice(["Sure! I've added", "Got it! I added", "Okay, I've created a task:", "Done! Added"])
        tail = f" with {_PRIORITY_WORDS[task['priority']]} priority" if rng.random() < 0.5 else ""
        return f'{opener} "{title}"{when}{tail}.'
    if choice == "lines":
        lines = [f"Task: {title}", f"Due: {due or 'no date'}", f"Priority: {_PRIORITY_WORDS[task['priority']]}"]
        if labels:
            lines.append("Labels: " + ", ".join(labels))
        return "\n".join(lines)
    body = {"task": title, "description": rng.choice(["A new task.", f"Remember to {title.lower()}."]),
            "due_date": due, "priority": _PRIORITY_WORDS[task["priority"]], "tags": labels}
    return "Here is the task JSON:\n\n```json\n" + json.dumps(body, indent=2, ensure_ascii=False) + "\n```"


def rejected_answer(example: TaskExample, rng: random.Random) -> tuple[str, str]:
    """(a wrong answer for ``example``, its kind), both drawn from ``rng``."""
    task = example.task
    kind = rng.choice(PREFERENCE_KINDS)
    if kind == "priority":
        wrong = _wrong_priority(task, rng)
    elif kind == "labels":
        wrong = _wrong_labels(task, rng)
    elif kind == "due_string":
        wrong = _wrong_due(task, example.request, rng)
    elif kind == "title":
        wrong = _wrong_title(task, example.request, rng)
    elif kind == "malformed":
        wrong = _malformed(task, rng)
    else:
        wrong = _chatty(task, rng)
    assert wrong != example.answer, (kind, example.request)
    return wrong, kind


def preference_pairs(examples: list[TaskExample], *, seed: int = PREFS_SEED) -> list[PreferencePair]:
    """One pair per example, in order; example ``i`` draws from ``random.Random(seed * stride + i)``."""
    pairs = []
    for index, example in enumerate(examples):
        wrong, kind = rejected_answer(example, random.Random(seed * _INDEX_STRIDE + index))
        pairs.append(PreferencePair(example, wrong, kind))
    return pairs


def generate_preferences(n_train: int = 2000, n_val: int = 200) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Pairs built from ``generate(n_train, n_val)``: (training pairs, held-out pairs)."""
    splits = generate(n_train, n_val)
    return preference_pairs(splits.train), preference_pairs(splits.val, seed=PREFS_SEED + 1)
