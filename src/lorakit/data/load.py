"""``load_data``: a training set and a held-out set from a built-in dataset or any source `sources.rows` reads."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from . import task_api
from .dataset import TokenizedDataset, tokenize_records
from .preference import (PREFERENCE_REASONS, PreferenceDataset, parse_preference, preference_records_from_dicts,
                         tokenize_preferences)
from .records import parse_record, records_from_dicts
from .sources import read_rows

__all__ = ["BUILTIN_DATASETS", "BUILTIN_PREFERENCES", "DataSplits", "PreferenceSplits", "split_records", "load_data",
           "load_preferences", "heldout_records"]


def _task_api() -> tuple[list[dict], list[dict]]:
    splits = task_api.generate()
    return [e.to_record() for e in splits.train], [e.to_record() for e in splits.val]


# name -> () -> (train records, held-out records), as JSON-like dicts.
BUILTIN_DATASETS: dict[str, Callable[[], tuple[list[dict], list[dict]]]] = {"task-api": _task_api}


def _task_api_prefs() -> tuple[list[dict], list[dict]]:
    train, val = task_api.generate_preferences()
    return [p.to_record() for p in train], [p.to_record() for p in val]


# name -> () -> (train pairs, held-out pairs) as prompt/chosen/rejected records, for DPO and ORPO.
BUILTIN_PREFERENCES: dict[str, Callable[[], tuple[list[dict], list[dict]]]] = {"task-api-prefs": _task_api_prefs}


@dataclass
class DataSplits:
    """The training set and the held-out set (None when no held-out data was asked for)."""

    train: TokenizedDataset
    val: TokenizedDataset | None


def split_records(records: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle picks ``round(len * val_fraction)`` records (at least 1).

    The same records, fraction and seed always give the same split; each part keeps file order.
    """
    picked = _held_out(len(records), val_fraction, seed)
    train = [r for i, r in enumerate(records) if i not in picked]
    val = [r for i, r in enumerate(records) if i in picked]
    return train, val


def _held_out(n: int, val_fraction: float, seed: int) -> set[int]:
    """The indices `split_records` holds out of ``n`` records."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1 (for example 0.1)")
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ConfigError(
            f"val_fraction={val_fraction} of {n} records leaves nothing to train on; "
            "use a smaller fraction or more records"
        )
    return set(random.Random(seed).sample(range(n), n_val))


@dataclass(frozen=True)
class _Kind:
    """How one kind of data is read and tokenized: supervised records or preference pairs."""

    builtins: dict[str, Callable[[], tuple[list[dict], list[dict]]]]
    read: Callable  # (source, skipped=Counter or None, heldout=) -> records, one at a time (`sources.read_rows`)
    from_dicts: Callable  # (dicts, name) -> records
    tokenize: Callable  # (records, tokenizer, skipped=, name=, max_length=, overlong=, skip_bad_records=)
    other: dict  # the other kind's built-ins: named in the error when one is given here
    advice: str


def _load(kind: _Kind, train, tokenizer, val, val_fraction, seed, options) -> tuple:
    """(training set, held-out set or None): see `load_data`."""
    if val is not None and val_fraction:
        raise ConfigError("pass either val (a held-out file) or val_fraction, not both")
    name = str(train)
    if name in kind.other:
        raise ConfigError(f"{name}: {kind.advice}")
    if name in kind.builtins:
        if val_fraction:
            raise ConfigError(f"{name} has a fixed held-out split; drop val_fraction (or pass val=FILE)")
        train_dicts, val_dicts = kind.builtins[name]()
        train_records, train_skipped = kind.from_dicts(train_dicts, f"{name}:train"), Counter()
        val_records, val_skipped = kind.from_dicts(val_dicts, f"{name}:val"), Counter()
        val_name = f"{name} (held-out)"
    else:
        skip = options["skip_bad_records"]
        name, val_records, val_skipped = _display_name(train), None, Counter()
        train_skipped = Counter()
        train_records = kind.read(train, skipped=train_skipped if skip else None)
        val_name = f"{name} (held-out {val_fraction:g})"
        if val_fraction:
            # read three times, one record at a time: count, then each part (nothing held in memory)
            picked = _held_out(sum(1 for _ in kind.read(train, skipped=Counter() if skip else None)),
                               val_fraction, seed)
            train_records = (r for i, r in enumerate(train_records) if i not in picked)
            val_records = (r for i, r in enumerate(kind.read(train, skipped=Counter() if skip else None))
                           if i in picked)
    if val is not None:
        val_skipped = Counter()
        val_records = kind.read(val, skipped=val_skipped if options["skip_bad_records"] else None, heldout=True)
        val_name = _display_name(val)
    train_set = kind.tokenize(train_records, tokenizer, skipped=train_skipped, name=name, **options)
    val_set = None
    if val_records is not None:
        val_set = kind.tokenize(val_records, tokenizer, skipped=val_skipped, name=val_name, **options)
    return train_set, val_set


def _display_name(source) -> str:
    """A file's name, or the directory / dataset name as given."""
    path = Path(source)
    return path.name if path.is_file() else str(source)


_SUPERVISED = _Kind(BUILTIN_DATASETS, read_rows, records_from_dicts, tokenize_records, BUILTIN_PREFERENCES,
                    "holds preference pairs, for --method dpo or orpo; supervised training takes "
                    f"{', '.join(BUILTIN_DATASETS)} or a file of text, prompt/completion, messages, Alpaca or ShareGPT records")
_PREFERENCES = _Kind(BUILTIN_PREFERENCES, functools.partial(read_rows, parse=parse_preference,
                                                             reasons=PREFERENCE_REASONS),
                     preference_records_from_dicts, tokenize_preferences,
                     BUILTIN_DATASETS, "holds supervised examples, not preference pairs; for DPO or ORPO use "
                     f"{', '.join(BUILTIN_PREFERENCES)} or a file of prompt/chosen/rejected records")


def load_data(
    train: str | os.PathLike = "task-api",
    *,
    tokenizer,
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_length: int | None = 1024,
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    record_format: str | None = None,
    fields: dict[str, str] | None = None,
) -> DataSplits:
    """Read, check and tokenize training data, and its held-out part.

    ``train`` is a built-in dataset name (``"task-api"``, which has a fixed held-out split), a
    data file (.jsonl, .json, .csv, .tsv, .parquet), a ``datasets`` directory or a dataset in the
    ``datasets`` cache (`sources.rows`), read one record at a time; the examples are kept on disk
    (`store.ExampleStore`). The held-out set is ``val`` (a dataset with splits: its validation or
    test split), else a seeded ``val_fraction`` of the training data, else the built-in split,
    else None. ``max_length``, ``overlong`` and
    ``skip_bad_records`` are as in ``tokenize_records`` and ``read_jsonl``; what was skipped is
    on each result's ``skipped`` counts. ``record_format`` reads every record as that shape
    (`records.SHAPES`: text, completion, chat, alpaca, sharegpt) instead of detecting it;
    ``fields`` maps record fields to the file's column names (``{"prompt": "question"}``).
    """
    options = dict(max_length=max_length, overlong=overlong, skip_bad_records=skip_bad_records)
    kind = _supervised(train, record_format, fields)
    return DataSplits(*_load(kind, train, tokenizer, val, val_fraction, seed, options))


def _supervised(train, record_format: str | None, fields: dict[str, str] | None) -> _Kind:
    """How supervised records are read: each in its detected shape, or as ``record_format`` and ``fields`` say."""
    if record_format is None and not fields:
        return _SUPERVISED
    if str(train) in BUILTIN_DATASETS:
        raise ConfigError(f"{train} is built in; record_format and fields (--format, --field) describe a file's records")
    parse = functools.partial(parse_record, record_format=record_format, fields=dict(fields or {}))
    return dataclasses.replace(_SUPERVISED, read=functools.partial(read_rows, parse=parse, fields=dict(fields or {})))


def heldout_records(train: str | os.PathLike = "task-api", *, val: str | os.PathLike | None = None,
                    val_fraction: float = 0.0, seed: int = 0, skip_bad_records: bool = False,
                    record_format: str | None = None, fields: dict[str, str] | None = None,
                    preference: bool = False) -> Iterator | None:
    """The held-out records `load_data` (``preference``: `load_preferences`) keeps with the same
    arguments, in the same order, as read (`records.Record`, or `preference.PreferenceRecord`):
    one at a time and never tokenized. ``val``, else the seeded ``val_fraction`` of ``train``,
    else a built-in set's fixed split; None when there is no held-out data."""
    if val is not None and val_fraction:
        raise ConfigError("pass either val (a held-out file) or val_fraction, not both")
    kind = _PREFERENCES if preference else _supervised(train, record_format, fields)
    name = str(train)
    if name in kind.other:
        raise ConfigError(f"{name}: {kind.advice}")

    def read(source, **more):
        return kind.read(source, skipped=Counter() if skip_bad_records else None, **more)

    if val is not None:
        return read(val, heldout=True)
    if name in kind.builtins:
        if val_fraction:
            raise ConfigError(f"{name} has a fixed held-out split; drop val_fraction (or pass val=FILE)")
        return iter(kind.from_dicts(kind.builtins[name]()[1], f"{name}:val"))
    if not val_fraction:
        return None
    picked = _held_out(sum(1 for _ in read(train)), val_fraction, seed)  # as `_load` counts and picks
    return (r for i, r in enumerate(read(train)) if i in picked)


@dataclass
class PreferenceSplits:
    """The training pairs and the held-out pairs (None when no held-out data was asked for)."""

    train: PreferenceDataset
    val: PreferenceDataset | None


def load_preferences(
    train: str | os.PathLike = "task-api-prefs",
    *,
    tokenizer,
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_length: int | None = 1024,
    overlong: str = "truncate",
    skip_bad_records: bool = False,
) -> PreferenceSplits:
    """Read, check and tokenize preference pairs (`lorakit.data.preference`) and their held-out
    part, as `load_data` does for supervised records: a built-in set (``"task-api-prefs"``, with
    its fixed held-out split) or a JSONL file, held out by ``val``, else ``val_fraction``."""
    options = dict(max_length=max_length, overlong=overlong, skip_bad_records=skip_bad_records)
    return PreferenceSplits(*_load(_PREFERENCES, train, tokenizer, val, val_fraction, seed, options))
