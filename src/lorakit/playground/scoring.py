"""Held-out examples through several served models at once, scored as `lorakit eval` scores them.

Every (model, example) pair becomes one greedy chat request, checked as /v1/chat/completions
checks it (`lorakit.infer.openai_api.parse_chat`), and all of them are queued on the server's
`Scheduler` together, so they run in shared batches, each row with its own adapter. A one-line
scorer's answer (task-api's JSON) ends at its first line break, as `score_examples` ends it:
the request's stop string is "\\n" and every token holding a line break ends the row. The
predictions are scored with the scorer `lorakit eval` uses (`lorakit.evaluation.SCORERS`), as a
whole per model and one by one for each example's verdict.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from lorakit.evaluation import SCORERS
from lorakit.evaluation.scoring import ONE_LINE_SCORERS
from lorakit.infer import openai_api as api
from lorakit.infer.scheduler import Job
from lorakit.playground.examples import HeldOut

if TYPE_CHECKING:
    from lorakit.infer.server import Server

__all__ = ["score_models", "chat_body"]


def chat_body(model: str, messages: list[dict], max_tokens: int, scorer: str) -> dict:
    """The greedy /v1/chat/completions request that answers one example for scoring."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    return {**body, "stop": ["\n"]} if scorer in ONE_LINE_SCORERS else body


def score_models(app: "Server", held: HeldOut, models: Sequence[str], *, max_tokens: int,
                 line_breaks: Sequence[int] = ()) -> dict:
    """Each example through each model (greedy, in shared batches), scored. ``line_breaks``:
    `lorakit.evaluation.line_breaks_for` (scorer, tokenizer), the tokens that end a one-line answer."""
    adapters = {model: app.resolve(model) for model in models}
    jobs = {}
    for example in held.examples:  # every request is checked before any is queued; an example's models side by side
        for model in models:
            call = api.parse_chat(chat_body(model, example.messages, max_tokens, held.scorer), app.tokenizer,
                                  app.limits)
            stops = (*call.sampling.stop_token_ids, *line_breaks)
            call.sampling = dataclasses.replace(call.sampling, stop_token_ids=stops)
            jobs[model, example.index] = Job.from_call(call, adapters[model], app.tokenizer)
    for job in jobs.values():
        app.scheduler.submit(job)
    try:
        texts = {key: _answer(job) for key, job in jobs.items()}
    finally:
        for job in jobs.values():  # after an error: the others are not waited for, so not run
            job.cancelled = True
    score = SCORERS[held.scorer]
    references = [e.reference for e in held.examples]
    results, correct = {}, {}
    for model in models:
        predictions = [texts[model, e.index] for e in held.examples]
        exact, fields = score(predictions, references)
        correct[model] = [score([p], [r])[0] == 1.0 for p, r in zip(predictions, references)]
        results[model] = {"exact": exact, "correct": sum(correct[model]), "fields": fields}
    rows = []
    for i, e in enumerate(held.examples):
        verdicts = {m: correct[m][i] for m in models}
        rows.append({"index": e.index, "prompt": e.prompt, "reference": e.reference,
                     "predictions": {m: texts[m, e.index] for m in models}, "correct": verdicts,
                     "disagree": len(set(verdicts.values())) > 1})
    return {"scorer": held.scorer, "n": len(held.examples), "models": results, "examples": rows}


def _answer(job: Job) -> str:
    """The job's text once it is done (stripped, as `score_examples` strips), or its error raised."""
    while True:
        kind, payload, _ = job.events.get()
        if kind == "error":
            raise payload
        if kind == "done":
            return job.rows[0].stream.text.strip()
