"""Continuous batching for the serving worker, on the fast decoder (`lorakit.generation.batcher`).

`ContinuousBatching` is the part of `lorakit.infer.scheduler.Scheduler` that runs a batch on a
`Batcher` kept between batches (with the decoder's prefix cache): the batch's jobs go in, and
while it runs, jobs queued behind it join at the next step as long as their rows fit (in queue
order: the first that does not fit, an adapter change or the stop waits for the batch to end, and
so does everything behind it). A row leaves at once when `_route` says it is over. The scheduler
provides the queue, the gate and the flags, `_route`, `_finish_row`, `_record` and `_runnable`.
"""

from __future__ import annotations

import queue
from typing import Callable

from lorakit.generation.batcher import Batcher
from lorakit.generation.decoder import Decoder, autocast_dtype, unsupported
from lorakit.generation.engine import eos_token_ids
from lorakit.infer.jobs import Batch, Job, Row, resumed

__all__ = ["ContinuousBatching"]


class ContinuousBatching:
    """The scheduler's continuous batches (see the module docstring)."""

    continuous = True
    """Run batches continuously on the fast decoder where the model allows; False: one
    `generate_batch` call a batch (no job joins a running batch)."""
    _batcher: Batcher | None = None  # made on first use, dropped when the adapters change
    _fast: bool | None = None  # whether the model runs on the fast decoder (None: not asked yet)

    def _forget_decoder(self) -> None:
        """The model's adapters changed: the decoder packs its weights again on the next batch."""
        self._batcher, self._fast = None, None

    def _use_fast(self) -> bool:
        if self._fast is None:
            self._fast = unsupported(self.model) is None
        return self.continuous and self._fast

    def _continuous(self) -> Batcher:
        if self._batcher is None:
            device = next(self.model.parameters()).device
            decoder = Decoder(self.model, slots=self.max_batch, dtype=autocast_dtype(self.autocast, device))
            self._batcher = Batcher(self.model, self.tokenizer, decoder)
        self._batcher.clear()  # rows a failed batch left
        return self._batcher

    def _run_continuous(self, live: list[Job], jobs: list[Job], admit: bool) -> None:
        batcher = self._continuous()
        eos = eos_token_ids(self.model, self.tokenizer)
        entries: list[tuple[Job, Row]] = []  # a row's key in the batcher is its index here

        def enter(job: Job) -> None:
            for row in job.rows:
                if not row.done:
                    batcher.add(len(entries), resumed(job, row))
                    entries.append((job, row))

        for job in live:
            enter(job)
        while len(batcher):
            for key, token_id, ended in batcher.step():
                job, row = entries[key]
                if not self._route(job, row, token_id, eos) and not ended:
                    batcher.drop(key)
                elif ended and not row.done and not job.cancelled:
                    self._finish_row(job, row, eos)
            if admit:
                self._admit(batcher, jobs, enter)

    def _admit(self, batcher: Batcher, jobs: list[Job], enter: Callable[[Job], None]) -> None:
        """Jobs waiting in order join the running batch while their rows fit; the first that does
        not (or an adapter change, or the stop) waits for the batch to end, and so does all behind it."""
        while self._gate.is_set() and not self._closing and not self._cancel:
            from_held = bool(self._held)
            try:
                item = self._held.pop(0) if from_held else self._queue.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, Job) or len(item.rows) > batcher.free:
                if from_held:
                    self._held.insert(0, item)
                else:
                    self._held.append(item)
                return
            joining = self._runnable([item])
            if joining:
                jobs.append(item)
                self._record(Batch(1, len(item.rows), (item.adapter,)))
                enter(item)
