"""What the serving worker runs: a request's rows (`Job`, `Row`), an adapter change, and what a
batch held (`Batch`); request threads make them, `lorakit.infer.scheduler` runs them."""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field

from lorakit.generation.engine import Request
from lorakit.infer.openai_api import Call, RequestError
from lorakit.infer.textstream import TextStream

__all__ = ["Row", "Job", "AdapterChange", "Batch", "resumed"]


@dataclass
class Row:
    """One prompt of a job: its ids, its text so far, and how it ended."""

    prompt_ids: list[int]
    stream: TextStream
    ids: list[int] = field(default_factory=list)  # the generated tokens, as the engine reports them
    done: bool = False  # ended: its text and finish_reason are final
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    """One HTTP request's generation. ``events`` receives, in order: when streaming,
    ``("text", row, piece)`` for each piece of a row's text and ``("finish", row, None)`` when the
    row ends; then ``("done", None, None)`` once every row ended, or ``("error", RequestError, None)``."""

    call: Call
    adapter: str | None  # None: the base model
    rows: list[Row]
    stream: bool
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # the client went away, or the server stopped: stop sending it text
    answered: bool = False  # "done" was sent (every row ended), or the error

    @classmethod
    def from_call(cls, call: Call, adapter: str | None, tokenizer) -> "Job":
        rows = [Row(ids, TextStream(tokenizer, call.stop)) for ids in call.prompts]
        return cls(call, adapter, rows, call.stream)

    def fail(self, error: RequestError) -> None:
        if not self.answered:
            self.answered = True
            self.events.put(("error", error, None))


@dataclass
class AdapterChange:
    """Add (``path`` given) or remove an adapter, between batches; ``done`` is set after, with
    ``error`` holding what went wrong, if anything."""

    name: str
    path: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


@dataclass(frozen=True)
class Batch:
    """The jobs that started a batch together, or a job that joined a running one."""

    requests: int
    rows: int
    models: tuple[str | None, ...]  # each request's adapter (None: the base model)


def resumed(job: Job, row: Row) -> Request:
    """The engine's request for a row: its prompt, or (a row that has tokens from a failed batch)
    its prompt and those tokens, with the new tokens it has left."""
    sampling = job.call.sampling
    if not row.ids:
        return Request(row.prompt_ids, job.adapter, sampling)
    left = dataclasses.replace(sampling, max_new_tokens=sampling.max_new_tokens - len(row.ids))
    return Request(row.prompt_ids + row.ids, job.adapter, left)
