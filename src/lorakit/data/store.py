"""Tokenized examples kept on disk, not in memory: how a data set larger than memory trains.

`ExampleStore` appends each example's token ids and labels, as int32 pairs, to an unnamed temporary
file (deleted when the store is, or when the process ends) and maps it back read-only; in memory
stay only the offsets and where each example came from (some 20 bytes an example). Indexing a
`ExampleView` gives an ordinary `Example`, so collators and scorers see no difference; the pages
of the file the operating system keeps in memory are a cache it can drop.
"""

from __future__ import annotations

import re
import tempfile
from array import array
from collections.abc import Iterable, Sequence

import numpy as np

from .encode import Example

__all__ = ["ExampleStore", "ExampleView", "lengths_of", "subset"]

_FLUSH_BYTES = 1 << 18
_NUMBERED = re.compile(r"^(.*?)(\d+)$", re.DOTALL)


class ExampleStore:
    """Append-only storage of tokenized examples; `view` (after the last `append`) reads them."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="lorakit-tokens-")
        self._pending = bytearray()
        self._ends = array("q")  # each example's end, in tokens from the start of the file
        self._prefix_ids = array("i")  # its source as (prefix, number): "data.jsonl:" and 12
        self._numbers = array("q")
        self._prefixes: list[str] = []
        self._prefix_index: dict[str, int] = {}
        self._tokens: np.ndarray | None = None

    def append(self, example: Example) -> None:
        if self._tokens is not None:
            raise RuntimeError("ExampleStore: append after view()")
        pair = np.empty((len(example), 2), dtype=np.int32)
        pair[:, 0], pair[:, 1] = example.input_ids, example.labels
        self._pending += pair.tobytes()
        if len(self._pending) >= _FLUSH_BYTES:
            self._flush()
        self._ends.append((self._ends[-1] if self._ends else 0) + len(example))
        match = _NUMBERED.match(example.source)
        prefix, number = (match.group(1), int(match.group(2))) if match else (example.source, -1)
        if prefix not in self._prefix_index:
            self._prefix_index[prefix] = len(self._prefixes)
            self._prefixes.append(prefix)
        self._prefix_ids.append(self._prefix_index[prefix])
        self._numbers.append(number)

    def __len__(self) -> int:
        return len(self._ends)

    def view(self) -> ExampleView:
        """All examples appended, in order (the file is mapped read-only from here on)."""
        if self._tokens is None:
            self._flush()
            self._file.flush()
            total = self._ends[-1] if self._ends else 0
            self._tokens = (np.memmap(self._file, dtype=np.int32, mode="r", shape=(total, 2)) if total
                            else np.empty((0, 2), dtype=np.int32))
            self._ends_np = np.frombuffer(self._ends, dtype=np.int64)
        return ExampleView(self, np.arange(len(self), dtype=np.int64))

    def example(self, i: int) -> Example:
        start = int(self._ends_np[i - 1]) if i else 0
        pairs = self._tokens[start:int(self._ends_np[i])]
        number = self._numbers[i]
        source = self._prefixes[self._prefix_ids[i]] + (str(number) if number >= 0 else "")
        return Example(pairs[:, 0].tolist(), pairs[:, 1].tolist(), source)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        starts = np.concatenate(([0], self._ends_np[:-1]))
        return (self._ends_np - starts)[indices]

    def _flush(self) -> None:
        if self._pending:
            self._file.write(self._pending)
            self._pending = bytearray()


class ExampleView(Sequence):
    """Some examples of an `ExampleStore`, in a given order; slicing and `select` give views."""

    def __init__(self, store: ExampleStore, indices: np.ndarray):
        self._store, self._indices = store, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ExampleView(self._store, self._indices[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._store.example(int(self._indices[index]))

    def select(self, indices: Iterable[int]) -> ExampleView:
        return ExampleView(self._store, self._indices[np.asarray(list(indices), dtype=np.int64)])

    @property
    def lengths(self) -> list[int]:
        return self._store.lengths(self._indices).tolist()


def subset(examples: Sequence, indices: Iterable[int]) -> Sequence:
    """``examples`` at ``indices``: a view of a view, a list of a list."""
    if isinstance(examples, ExampleView):
        return examples.select(indices)
    return [examples[i] for i in indices]


def lengths_of(examples: Sequence) -> list[int]:
    """Each example's token count, without building the examples of a view."""
    return examples.lengths if isinstance(examples, ExampleView) else [len(e) for e in examples]
