"""The serving worker: one thread owns the model and runs everything waiting as one batch.

Request threads put `Job`s (one or more prompts for one model: the base model or an adapter)
and `AdapterChange`s on a queue. The worker takes the first item and everything else waiting
behind it, up to ``max_batch`` rows, and runs the rows together, each row with its own adapter
and sampling. On a Llama-family model the batch is continuous (`lorakit.generation.batcher` over
the fast decoder, which the worker keeps between batches with its prefix cache): a job queued
while the batch runs joins it at the next step when its rows fit, and a row that ends leaves
at once; the batch ends when its last row does. Other models run
`lorakit.generation.engine.generate_batch` over the model's own forward. Each token
is routed back to its job as it is produced (a job's ``events`` queue), so streaming clients
see text while the batch is still running, and a job is answered as soon as its own rows end
(at EOS, a stop token or string, or ``max_new_tokens``), not when the batch ends. Adapter
changes are applied by the same thread between batches, so a batch never sees the model change
under it; a change queued behind jobs runs after them. One row's exception does not fail its
neighbours: when a batch fails, its unanswered jobs run again one by one, each going on from the
text it already has, so only the job whose row fails gets the error (a 500) and every other job
gets its whole answer (a greedy one the same text; a sampled one draws its rest afresh).

``drain(timeout)`` is a graceful stop: no new job is taken (503), the queued and running jobs run
on until the deadline, and whatever is left then is cancelled with a 503 (a running row ends at its
next token), so the worker has stopped when it returns.

``batches`` records each batch as it starts and each job that joins a running batch (how many
requests and rows, for which models), so a test or an operator can see that concurrent requests
were served together. ``pause`` / ``resume`` hold the
worker before it gathers a batch (for tests that must queue several requests first).
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Callable

from lorakit.errors import LorakitError
from lorakit.generation.engine import Request, eos_token_ids, finish_reason, generate_batch, row_ended
from lorakit.infer.continuous import ContinuousBatching
from lorakit.infer.jobs import AdapterChange, Batch, Job, Row, resumed
from lorakit.infer.openai_api import RequestError
from lorakit.inject import ModulesToSave, logical_modules, replace_module
from lorakit.layer import LoraLayer
from lorakit.model import PeftModel

__all__ = ["Scheduler", "Job", "Row", "AdapterChange", "Batch"]

_STOP = object()


class Scheduler(ContinuousBatching):
    """Owns the model; runs queued jobs in batches on one worker thread (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, autocast: Callable | None = None,
                 adapters: dict[str, str] | None = None):
        """``model``: the base model, or a PeftModel already holding ``adapters`` (name -> the
        directory each was loaded from)."""
        self.model = model  # the base model, or a PeftModel once it holds adapters
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.autocast = autocast
        # name -> the directory it was loaded from; replaced (never changed in place) by the worker,
        # so request threads read it without a lock
        self.adapters: dict[str, str] = dict(adapters or {})
        self.batches: list[Batch] = []
        self.on_batch: Callable[[Batch], None] | None = None  # told of each batch as it starts (logging)
        self._queue: queue.Queue = queue.Queue()
        self._held: list = []  # taken from the queue but left for the next batch
        self._gate = threading.Event()
        self._gate.set()
        self._submitted = 0
        self._closing = False  # no new job is queued (503)
        self._draining = False  # queued jobs still run (drain); else close refuses them
        self._cancel = False  # drain's deadline passed: running rows end at their next token
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lorakit-serve-worker", daemon=True)

    # -- the request threads' side
    def start(self) -> None:
        self._thread.start()

    def submit(self, item: Job | AdapterChange) -> None:
        if self._closing:
            return _refuse(item)
        self._queue.put(item)
        with self._cond:
            self._submitted += 1
            self._cond.notify_all()

    @property
    def submitted(self) -> int:
        """How many jobs and adapter changes have been queued since the start."""
        return self._submitted

    def wait_submitted(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``submitted`` reaches ``count`` (False if ``timeout`` passes first)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._submitted >= count, timeout)

    def pause(self) -> None:
        """Hold the worker before it gathers its next batch; requests keep queueing."""
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker: the batch running now finishes, and every job or adapter change still
        queued is refused with a 503 (by the worker, or here once it has stopped)."""
        self._closing = True
        self._queue.put(_STOP)
        self._gate.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # else the worker refuses the rest when its batch ends
            for item in self._held + _drain(self._queue):
                _refuse(item)

    def cancel(self) -> None:
        """End the running rows at their next token and refuse what is queued (503), during a drain."""
        self._cancel = True

    def drain(self, timeout: float, grace: float = 30.0) -> bool:
        """Stop gracefully: refuse new jobs (503), let the queued and running ones finish until
        ``timeout`` seconds pass, then cancel the rest (503; a running row ends at its next
        token) and wait up to ``grace`` seconds more for the forward pass under way. True when
        the worker has stopped."""
        self._closing, self._draining = True, True
        self._queue.put(_STOP)
        self._gate.set()
        if self._thread.is_alive():
            self._thread.join(max(timeout, 0.0))
        if self._thread.is_alive():
            self._cancel = True
            self._thread.join(grace)
        if self._thread.is_alive():
            return False
        for item in self._held + _drain(self._queue):
            _refuse(item)
        return True

    # -- adapters (called on the worker thread, or before it starts)
    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load the adapter directory ``path`` under ``name`` onto the base model."""
        if name in self.adapters:
            raise RequestError(f"an adapter named {name!r} is already served; "
                               f"remove it first (DELETE /v1/adapters/{name}) or pick another name",
                               status=409, param="name", code="adapter_exists")
        if not self.adapters:
            try:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            except Exception:
                _strip_adapters(self.model)  # the base model as it was
                raise
        else:
            try:
                self.model.load_adapter(path, name)
            except Exception:
                if name in self.model.peft_config:  # injected, then its weights failed to load
                    self.model.delete_adapter(name)
                raise
        self.adapters = {**self.adapters, name: str(Path(path))}  # replaced, never changed: readers see one state
        self._forget_decoder()

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter; removing the last one leaves the plain base model."""
        if name not in self.adapters:
            raise RequestError(f"no adapter named {name!r} is served; adapters: {', '.join(self.adapters) or 'none'}",
                               status=404, param="name", code="model_not_found")
        if len(self.adapters) == 1:
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)
        self.adapters = {n: p for n, p in self.adapters.items() if n != name}
        self._forget_decoder()

    # -- the worker
    def _run(self) -> None:
        while True:
            item = self._held.pop(0) if self._held else self._queue.get()
            self._gate.wait()
            if item is _STOP:
                if self._draining and not self._cancel and (self._held or not self._queue.empty()):
                    self._queue.put(_STOP)  # drain: what was queued before the stop runs first
                    continue
                return
            if self._closing and (not self._draining or self._cancel):
                _refuse(item)
                continue
            if isinstance(item, AdapterChange):
                self._change(item)
                continue
            jobs, rows = [item], len(item.rows)
            while not self._held:  # everything waiting that fits, in order
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, Job) and rows + len(nxt.rows) <= self.max_batch and not self._cancel:
                    jobs.append(nxt)
                    rows += len(nxt.rows)
                else:
                    self._held.append(nxt)
            self._run_isolated(jobs)

    def _run_isolated(self, jobs: list[Job]) -> None:
        """Run the jobs as one batch; when it fails, run each unanswered job alone (going on from
        its text so far), so a failure reaches only the job whose row caused it."""
        try:
            self._run_batch(jobs)
            return
        except Exception as err:
            failure = err
        if len(jobs) == 1:
            return jobs[0].fail(_generation_error(failure))
        for job in [job for job in jobs if not job.answered]:
            try:
                self._run_batch([job], admit=False)
            except Exception as err:  # this job's own failure
                job.fail(_generation_error(err))

    def _change(self, change: AdapterChange) -> None:
        try:
            if change.path is not None:
                self.add_adapter(change.name, change.path)
            else:
                self.remove_adapter(change.name)
        except Exception as err:  # reported to the request that asked for it
            change.error = err
        finally:
            change.done.set()

    def _run_batch(self, jobs: list[Job], admit: bool = True) -> None:
        """Run the jobs' unfinished rows; a row that already has tokens (a batch that failed under
        it) goes on from them. On the fast decoder, jobs queued meanwhile join (``admit``; each
        is appended to ``jobs``). Raises what the engine raised."""
        live = self._runnable(jobs)
        if not live:
            return
        batch = Batch(len(live), sum(1 for job in live for row in job.rows if not row.done),
                      tuple(job.adapter for job in live))
        self._record(batch)
        if self._use_fast():
            return self._run_continuous(live, jobs, admit)
        rows = [(job, row) for job in live for row in job.rows if not row.done]
        requests = [resumed(job, row) for job, row in rows]
        eos = eos_token_ids(self.model, self.tokenizer)
        seen = [0] * len(rows)

        def on_token(index: int, token_id: int) -> bool:
            seen[index] += 1
            return self._route(*rows[index], token_id, eos)

        outputs = generate_batch(self.model, self.tokenizer, requests, on_token=on_token, autocast=self.autocast)
        for index, ((job, row), ids) in enumerate(zip(rows, outputs)):  # what on_token did not see or end
            if not row.done and not job.cancelled:
                for token_id in list(ids)[seen[index]:]:
                    row.ids.append(token_id)
                    self._send(job, row, row.stream.push(token_id))
                self._finish_row(job, row, eos)

    def _runnable(self, jobs: list[Job]) -> list[Job]:
        """The jobs still to run; one whose adapter was removed while it waited is answered 404."""
        live = []
        for job in jobs:
            if job.adapter is not None and job.adapter not in self.adapters:
                job.fail(RequestError(f"the model {job.adapter!r} was removed before this request ran; models: "
                                      f"{', '.join(self.adapters) or '(the base model only)'}", status=404,
                                      param="model", code="model_not_found"))
            elif not job.answered:
                live.append(job)
        return live

    def _record(self, batch: Batch) -> None:
        self.batches.append(batch)
        if self.on_batch is not None:
            self.on_batch(batch)

    def _route(self, job: Job, row: Row, token_id: int, eos: set[int]) -> bool:
        """Route a token to its request; False when the row is over (its answer is complete: the
        engine's end, a stop string, or the client went away, or the server is stopping)."""
        if self._cancel and not job.answered:
            job.cancelled = True
            _refuse(job, "the server stopped before this request finished; send it again to a running server")
        if row.done or job.cancelled:
            return False
        row.ids.append(token_id)
        self._send(job, row, row.stream.push(token_id))
        asked = Request(row.prompt_ids, job.adapter, job.call.sampling)  # as the client asked
        if row.stream.stopped or row_ended(row.ids, asked, eos):  # a stop string, or the engine's end
            self._finish_row(job, row, eos)
        return not row.done

    # -- continuous batching on the fast decoder

    def _send(self, job: Job, row: Row, piece: str) -> None:
        if piece and job.stream and not job.cancelled:
            job.events.put(("text", row, piece))

    def _finish_row(self, job: Job, row: Row, eos: set[int]) -> None:
        """Release the row's held-back text and say why it ended; answer the job when it was the
        job's last row, so a short request does not wait for the rest of its batch."""
        self._send(job, row, row.stream.finish())
        row.completion_tokens = len(row.stream.ids)
        ended = finish_reason(row.ids, Request(row.prompt_ids, job.adapter, job.call.sampling), eos)
        row.finish_reason = "stop" if row.stream.stopped else ended
        row.done = True
        if job.stream:
            job.events.put(("finish", row, None))
        if all(r.done for r in job.rows) and not job.answered:
            job.answered = True
            job.events.put(("done", None, None))




def _generation_error(err: Exception) -> RequestError:
    detail = str(err) if isinstance(err, LorakitError) else f"{type(err).__name__}: {err}"
    return RequestError(f"generation failed: {detail}", status=500, type="server_error", code="generation_failed")


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _strip_adapters(model) -> None:
    """Undo a half-done first load: every LoRA layer and modules_to_save wrapper in ``model``
    back to the module it wraps."""
    for name, module in list(logical_modules(model)):
        if isinstance(module, LoraLayer):
            replace_module(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            replace_module(model, name, module.original_module)


def _refuse(item, message: str = "the server is shutting down; send the request to a running server") -> None:
    """Answer a queued job or adapter change with a 503: the server is shutting down."""
    error = RequestError(message, status=503, type="server_error", code="shutting_down")
    if isinstance(item, Job):
        item.fail(error)
    elif isinstance(item, AdapterChange):
        item.error = error
        item.done.set()
