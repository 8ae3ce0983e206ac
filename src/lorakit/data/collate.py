"""Batches: pad examples to one tensor, and optionally group similar lengths together."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .encode import IGNORE_INDEX, Example

__all__ = ["Collator", "length_grouped_batches", "example_fields"]


def example_fields(item: Example | Mapping) -> tuple[Sequence[int], Sequence[int]]:
    if isinstance(item, Mapping):
        return item["input_ids"], item["labels"]
    return item.input_ids, item.labels


@dataclass(frozen=True)
class Collator:
    """``collate_fn`` for a DataLoader: pads a list of Examples on the right.

    Returns ``input_ids`` (pad_token_id on padding), ``attention_mask`` (1 on tokens, 0 on
    padding) and ``labels`` (IGNORE_INDEX on padding), each a LongTensor of shape (B, T), where T
    is the longest example, rounded up to ``pad_to_multiple_of`` when set.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[Example | Mapping]) -> dict[str, torch.Tensor]:
        pairs = [example_fields(item) for item in batch]
        width = max(len(ids) for ids, _ in pairs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
        for row, (ids, labs) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            labels[row, : len(labs)] = torch.as_tensor(labs, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int = 0, group: int = 50
) -> list[list[int]]:
    """Index batches in which examples have similar lengths, so little of a batch is padding.

    Shuffles the indices with ``seed``, cuts them into groups of ``group * batch_size``, sorts
    each group by length (longest first) and cuts it into batches, then shuffles the batch order.
    Deterministic for a given seed; every index appears exactly once.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * max(1, group)
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
