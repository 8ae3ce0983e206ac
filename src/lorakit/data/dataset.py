"""Tokenized datasets: Records -> Examples under a max_length policy, with every drop counted."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DataError
from .encode import Example, encode_record
from .records import Record, RecordError, reject
from .store import ExampleStore, lengths_of

__all__ = ["OVERLONG_POLICIES", "TokenizedDataset", "check_length_policy", "length_profile", "tokenize_records"]

# What to do with an example longer than max_length tokens.
OVERLONG_POLICIES = ("truncate", "drop", "error")


@dataclass
class TokenizedDataset:
    """Examples ready for a collate function, and what was left out on the way, by reason.

    Indexing gives an ``Example`` (``input_ids``, ``labels``, ``source``); ``examples`` is a list
    or, from `tokenize_records`, an `ExampleView` of examples kept on disk. ``skipped`` maps a
    reason (a key of ``records.REASONS``) to how many records it removed; ``truncated`` counts
    examples cut to ``max_length`` and kept; ``profile`` is what `tokenize_records` measured on
    the way (records per shape, token lengths before truncation, label tokens).
    """

    examples: Sequence[Example]
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    name: str = ""
    profile: dict | None = None
    unit = "examples"  # what the summary counts

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Token count of each example (for bucketing and memory planning)."""
        return lengths_of(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_loss_tokens(self) -> int:
        if self.profile and "label_tokens" in self.profile:
            return self.profile["label_tokens"]
        return sum(e.num_loss_tokens for e in self.examples)

    def summary(self) -> str:
        """One line: ``name: 2,000 examples, 151,234 tokens; skipped 2 (invalid_json 1, ...)``."""
        line = f"{self.name or 'data'}: {len(self):,} {self.unit}, {self.num_tokens:,} tokens"
        if self.skipped:
            parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
            line += f"; skipped {sum(self.skipped.values()):,} ({parts})"
        if self.truncated:
            line += f"; truncated {self.truncated:,} to max_length"
        return line

    def describe(self) -> list[str]:
        """The data summary, a few lines: records read per shape, token lengths (p50 / p95 / max,
        before truncation), how many were truncated or left out and why, label tokens."""
        profile = self.profile or {}
        shapes = profile.get("shapes") or {}
        read = sum(shapes.values()) if shapes else len(self)
        lines = [f"{self.name or 'data'}: {read:,} records read"
                 + (f" ({', '.join(f'{k} {n:,}' for k, n in sorted(shapes.items()))})" if shapes else "")
                 + f", {len(self):,} {self.unit} kept"]
        if profile.get("lengths"):
            p50, p95, longest = profile["lengths"]
            cap = profile.get("max_length")
            lines.append(f"  tokens per example: p50 {p50:,}, p95 {p95:,}, max {longest:,}"
                         + (f" (max_length {cap:,})" if cap else ""))
        left = sum(self.skipped.values())
        lines.append(f"  truncated {self.truncated:,}; left out {left:,}"
                     + (f" ({', '.join(f'{r} {n:,}' for r, n in sorted(self.skipped.items()))})" if left else ""))
        lines.append(f"  label tokens (the loss covers): {self.num_loss_tokens:,} of {self.num_tokens:,}")
        return lines


def length_profile(lengths: Sequence[int]) -> list[int]:
    """[p50, p95, max] of token lengths (nearest-rank percentiles), or [] for none."""
    if not len(lengths):
        return []
    ordered = np.sort(np.asarray(lengths))
    rank = lambda q: int(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])  # noqa: E731
    return [rank(0.5), rank(0.95), int(ordered[-1])]


def check_length_policy(max_length: int | None, overlong: str) -> None:
    """ConfigError for an unknown ``overlong`` policy or a ``max_length`` below 2."""
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"overlong={overlong!r} is not a policy; use one of {', '.join(OVERLONG_POLICIES)}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length={max_length} is too small; use at least 2 (a typical value is 1024)")


def tokenize_records(
    records: Iterable[Record],
    tokenizer,
    *,
    max_length: int | None = 1024,
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    skipped: Counter | None = None,
    name: str = "",
) -> TokenizedDataset:
    """Tokenize ``records``; apply ``overlong`` to examples over ``max_length`` tokens.

    ``overlong``: ``"truncate"`` keeps the first ``max_length`` tokens (counted in
    ``truncated``), ``"drop"`` leaves the example out (counted as ``too_long``), ``"error"``
    treats it as a bad record. An example with no loss tokens left (its answer truncated away)
    is always left out and counted as ``no_loss_tokens``, so a batch can never give a NaN loss.
    ``skipped`` carries counts from reading (``read_jsonl``) into the result.
    """
    check_length_policy(max_length, overlong)
    # the reader may still be counting into ``skipped`` as records stream in: the same counter
    skipped = skipped if isinstance(skipped, Counter) else Counter(skipped or {})
    count_into = skipped if skip_bad_records else None
    store, truncated, shapes, full_lengths, label_tokens = ExampleStore(), 0, Counter(), array("i"), 0
    for record in records:
        shapes[record.shape or record.kind] += 1
        try:
            example = encode_record(record, tokenizer)
        except RecordError as error:
            reject(error, record.source, count_into)
            continue
        full_lengths.append(len(example))
        if max_length is not None and len(example) > max_length:
            if overlong == "drop":
                skipped["too_long"] += 1
                continue
            if overlong == "error":
                detail = f"{len(example)} tokens, more than max_length={max_length}"
                reject(RecordError("too_long", detail), record.source, count_into)
                continue
            example = Example(example.input_ids[:max_length], example.labels[:max_length], example.source)
            if example.num_loss_tokens:
                truncated += 1
        loss_tokens = example.num_loss_tokens
        if loss_tokens == 0:
            skipped["no_loss_tokens"] += 1
            continue
        store.append(example)
        label_tokens += loss_tokens
    if not len(store):
        counts = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "no records"
        raise DataError(f"{name or 'data'}: no usable examples ({counts}); fix the records or the max_length")
    profile = {"shapes": dict(shapes), "lengths": length_profile(full_lengths), "max_length": max_length,
               "label_tokens": label_tokens}
    return TokenizedDataset(store.view(), dict(skipped), truncated, name, profile)
