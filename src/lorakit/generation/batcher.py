"""Continuous batching over the fast decoder: rows join the running batch at any step and leave
as soon as they end.

    batcher = Batcher(model, tokenizer, decoder)
    batcher.add(key, request)          # queued; prefilled at the next step
    for key, token, ended in batcher.step():   # new rows' first tokens, and every other row's next
        ...
    batcher.drop(key)                  # a client that went away

Live rows occupy the decoder's slots 0..n-1 in order, so a decode step reads the cache's first n
slots as they lie; a row that ends gives its slot to the last row (`Decoder.move`). The rows
that join at a step are prefilled together into the next free slots (`Decoder.prefill_many`:
chunked, from the prefix cache where it can) with the weights the batch will step with, and each
one's first token is sampled from its prefill's logits.
Each row samples with its own `Sampling` and generator (`lorakit.generation.sampling`), ends at
EOS, at one of its stop tokens or at ``max_new_tokens`` (the same rule as `generate_batch`),
and keeps its adapter (None: the base model) for all its steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch

from lorakit.batching import BASE
from lorakit.generation.decoder import Decoder
from lorakit.generation.sampling import Request, eos_token_ids, generator, next_tokens, row_ended

__all__ = ["Batcher"]


@dataclass
class _Row:
    key: Hashable
    request: Request
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)  # generated so far

    @property
    def adapter(self) -> str | None:
        return None if self.request.adapter in (None, BASE) else self.request.adapter


class Batcher:
    """See the module docstring. ``max_rows``: rows stepping together at most (the decoder's slots)."""

    def __init__(self, model, tokenizer, decoder: Decoder):
        self.decoder = decoder
        self.eos = eos_token_ids(model, tokenizer)
        self.rows: list[_Row] = []  # live, in slot order
        self.waiting: deque[_Row] = deque()

    @property
    def max_rows(self) -> int:
        return self.decoder.slots

    def __len__(self) -> int:
        """Rows live or waiting."""
        return len(self.rows) + len(self.waiting)

    @property
    def free(self) -> int:
        """How many more rows can join now."""
        return self.max_rows - len(self.rows) - len(self.waiting)

    def add(self, key: Hashable, request: Request) -> None:
        """Queue a row; it is prefilled and gives its first token at the next `step`."""
        if self.free <= 0:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        if any(r.key == key for r in self.rows) or any(r.key == key for r in self.waiting):
            raise ValueError(f"a row with key {key!r} is already in the batch")
        needed = len(request.prompt_ids) + request.sampling.max_new_tokens
        self.decoder.reserve(needed)
        self.waiting.append(_Row(key, request, generator(request.sampling.seed, self.decoder.device)))

    def drop(self, key: Hashable) -> bool:
        """Remove a row (live or waiting); False if there is none with ``key``."""
        for row in list(self.waiting):
            if row.key == key:
                self.waiting.remove(row)
                return True
        for index, row in enumerate(self.rows):
            if row.key == key:
                self._leave(index)
                return True
        return False

    def clear(self) -> None:
        """Drop every row (after a step failed, say); the decoder's prefix cache stays."""
        self.rows.clear()
        self.waiting.clear()

    def step(self) -> list[tuple[Hashable, int, bool]]:
        """One step of the batch: the waiting rows are prefilled (each gives its first token), and
        the rows that were live take one token each. ``(key, token, ended)`` for every row that
        produced a token, in order; an ended row has left the batch."""
        events: list[tuple[Hashable, int, bool]] = []
        stepping = len(self.rows)
        if stepping:
            live = self.rows[:stepping]
            logits = self.decoder.step([r.ids[-1] for r in live], [r.adapter for r in live])
            events += self._take(live, logits)
        if self.waiting:
            joining = list(self.waiting)
            self.waiting.clear()
            slots = list(range(len(self.rows), len(self.rows) + len(joining)))
            self.rows += joining
            logits = self.decoder.prefill_many(slots, [list(r.request.prompt_ids) for r in joining],
                                               [r.adapter for r in joining],
                                               weights_for=[r.adapter for r in self.rows])  # the batch they make
            events += self._take(joining, torch.stack(logits))
        return events

    def _take(self, rows: list[_Row], logits: torch.Tensor) -> list[tuple[Hashable, int, bool]]:
        tokens = next_tokens(logits, [r.request.sampling for r in rows], [r.generator for r in rows])
        events = []
        for row, token in zip(rows, tokens):
            row.ids.append(token)
            ended = row_ended(row.ids, row.request, self.eos)
            events.append((row.key, token, ended))
        for row, (_, _, ended) in zip(rows, events):
            if ended:
                self._leave(self.rows.index(row))
        return events

    def _leave(self, index: int) -> None:
        last = len(self.rows) - 1
        if index != last:
            self.decoder.move(last, index)
            self.rows[index] = self.rows[last]
        self.rows.pop()
