"""Where records come from: rows of a file, a saved ``datasets`` directory, or the ``datasets`` cache.

Every source is read one row at a time, so a file larger than memory never is in memory:

- ``.jsonl`` / ``.ndjson``: one JSON object per line (`records.read_jsonl`'s strict line reader);
- ``.json``: a JSON array of objects, decoded item by item (a ``.json`` file of JSON lines is read as
  JSONL);
- ``.csv`` / ``.tsv``: a header row naming the columns, then one record per row (Python's ``csv`` in
  strict mode: a stray quote is an error naming its line); a ``messages`` or ``conversations`` cell
  holds that field as JSON text;
- ``.parquet``: row groups read in batches with pyarrow;
- a directory written by ``datasets``' ``save_to_disk`` (memory-mapped Arrow), ``DIR:SPLIT`` for one
  split of a ``DatasetDict``;
- ``NAME`` or ``NAME:SPLIT``, a dataset already in the local ``datasets`` cache (``load_dataset``
  offline: never a download).

Each row comes with its source, ``file:line`` (text formats) or ``file:row N`` (tables), which every
error about it names. A row that is not an object (or a table row with the wrong number of cells)
is a bad record like any other; a file that cannot be read at all is a `DataError`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import importlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError
from .records import REASONS, RecordError, _json_type, _unique_keys, jsonl_rows, parsed

__all__ = ["TABLE_SUFFIXES", "TEXT_SUFFIXES", "JSON_CELLS", "Row", "rows", "read_rows"]

TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
JSON_CELLS = ("messages", "conversations")
"""Fields a CSV/TSV cell holds as JSON text (a list of messages); a Parquet or ``datasets`` column
holds them as nested lists already."""

Row = tuple[str, object]
"""(source, the row as decoded or the RecordError that says why it is unusable)."""

_CHUNK = 1 << 18  # bytes read at a time from a JSON array
_BATCH = 256  # rows converted at a time from Arrow (Parquet, datasets)
_DEFAULT_SPLITS = ("train",)
_HELDOUT_SPLITS = ("validation", "valid", "val", "test")


def rows(spec: str | os.PathLike, *, fields: Mapping[str, str] | None = None, heldout: bool = False) -> Iterator[Row]:
    """Each row of ``spec`` (a file, a ``datasets`` directory or a cached dataset's name), in order.

    ``fields`` (record field -> column) names the CSV columns that hold JSON (those mapped to a
    `JSON_CELLS` field). ``heldout``: a dataset with splits gives its validation (or test) split
    instead of train, unless ``spec`` names one (``DIR:SPLIT``)."""
    path, split = _split_spec(spec)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _dataset_rows(_load_from_disk(path), str(path), split, heldout)
    if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and path.is_file() and not _is_array(path)):
        return jsonl_rows(path)
    if suffix == ".json":
        return _json_array_rows(path)
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, "\t" if suffix == ".tsv" else ",", fields or {})
    if suffix == ".parquet":
        return _parquet_rows(path)
    if path.exists():
        raise DataError(f"{path}: {path.suffix or 'a file without a suffix'} is not a data format lorakit reads; "
                        f"save it as .jsonl, .json, .csv, .tsv or .parquet")
    if suffix or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
        raise DataError(f"data file {path} not found; pass the path of a .jsonl, .json, .csv, .tsv or .parquet "
                        "file, a datasets directory, a dataset in the datasets cache, or a built-in dataset's name")
    return _cached_rows(str(path), split, heldout)


def read_rows(spec: str | os.PathLike, *, skipped: Counter | None, parse: Callable[[object, str], Any] = None,
              reasons: Mapping[str, str] = REASONS, fields: Mapping[str, str] | None = None,
              heldout: bool = False) -> Iterator:
    """The records of ``spec`` (`rows`), one at a time, as ``parse`` reads them (`records.parsed`:
    a bad one raises, or is counted in ``skipped``)."""
    return parsed(rows(spec, fields=fields, heldout=heldout), skipped=skipped, parse=parse, reasons=reasons)


def _split_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """(path, split): ``DIR:SPLIT`` or ``NAME:SPLIT`` names a split; an existing path never does."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and not Path(text).exists() and "/" not in tail and "." not in tail:
        return Path(head), tail
    return Path(text), None


def _is_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (else it is read as JSON lines)."""
    with path.open("rb") as f:
        start = f.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    return start.startswith(b"[")


def _json_array_rows(path: Path) -> Iterator[Row]:
    """The items of a JSON array, decoded one at a time from a buffer read in chunks; each item's
    source is the line it starts on. A syntax error stops the file (where the next item begins is
    unknown after it); an item that is not an object is one bad record."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    plain = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")()
    buf, pos, line, eof, expect = "", 0, 1, False, "["
    with path.open("rb") as f:
        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            try:
                buf = buf[pos:] + text.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line}: invalid UTF-8 ({exc.reason}); save the file as UTF-8") from None
            pos, eof = 0, not chunk
            return True

        def skip_space() -> None:
            nonlocal pos, line
            while True:
                start = pos
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                line += buf.count("\n", start, pos)
                if pos < len(buf) or not more():
                    return

        def fail(message: str) -> DataError:
            return DataError(f"{path}:{line}: {message}; a .json file must be one JSON array of records "
                             f"(or one JSON object per line)")

        while True:
            skip_space()
            if pos >= len(buf):
                raise fail("the file ends inside the array" if expect != "[" else "the file is empty")
            char = buf[pos]
            if expect == "[":
                if char != "[":
                    raise fail(f"expected '[' at the start, found {char!r}")
                pos, expect = pos + 1, "item or ]"
                continue
            if char == "]" and expect != "item":
                pos += 1
                skip_space()
                if pos < len(buf):
                    raise fail(f"unexpected {buf[pos]!r} after the array's closing ']'")
                return
            if expect == ", or ]":
                if char != ",":
                    raise fail(f"expected ',' or ']' between items, found {char!r}")
                pos, expect = pos + 1, "item"
                continue
            source = f"{path}:{line}"
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    break
                except RecordError as error:  # a duplicate key: skip the item, keep reading
                    item, end = error, plain.raw_decode(buf, pos)[1]
                    break
                except json.JSONDecodeError as exc:
                    if not more():
                        raise fail(f"invalid JSON ({exc.msg}, line {line + exc.doc.count(chr(10), pos, exc.pos)})"
                                   ) from None
            line += buf.count("\n", pos, end)
            pos, expect = end, ", or ]"
            if isinstance(item, RecordError) or isinstance(item, dict):
                yield source, item
            else:
                yield source, RecordError("wrong_type", f"the item is {_json_type(item)}, not an object")


def _csv_rows(path: Path, delimiter: str, fields: Mapping[str, str]) -> Iterator[Row]:
    """A CSV / TSV file's rows as {column: cell} objects; cells are strings, an empty cell is absent
    (an optional field left empty), a `JSON_CELLS` column's cell is decoded from JSON."""
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    json_columns = {fields.get(name, name) for name in JSON_CELLS}
    kind = "TSV" if delimiter == "\t" else "CSV"
    with path.open(newline="", encoding="utf-8-sig", errors="strict") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty; a {kind} file needs a header row naming its columns")
            named = [h.strip() for h in header]
            if any(not h for h in named) or len(set(named)) < len(named):
                raise DataError(f"{path}:1: the header row must name each column once (found: {', '.join(named)})")
            start = reader.line_num + 1
            for cells in reader:
                source, start = f"{path}:{start}", reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(named):
                    yield source, RecordError("wrong_type", f"the row has {len(cells)} cells, the header "
                                                            f"{len(named)} ({', '.join(named)})")
                    continue
                yield source, _cells(dict(zip(named, cells)), json_columns)
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}; quote a cell that holds the delimiter, a quote or "
                            f"a line break, and double each quote inside it (\"say \"\"hi\"\"\")") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: invalid UTF-8 ({exc.reason}); save the file as UTF-8"
                            ) from None


def _cells(row: dict[str, str], json_columns: set[str]) -> dict | RecordError:
    out = {}
    for column, cell in row.items():
        if cell == "":
            continue
        if column in json_columns:
            try:
                out[column] = json.loads(cell)
            except json.JSONDecodeError as exc:
                return RecordError("invalid_json", f'the "{column}" cell is not JSON ({exc.msg}); it holds '
                                                   f"a JSON array of messages")
        else:
            out[column] = cell
    return out


def _parquet_rows(path: Path) -> Iterator[Row]:
    pq = _import("pyarrow.parquet", "pyarrow", "Parquet files")
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError: not a Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in table.iter_batches(batch_size=_BATCH):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", {k: v for k, v in row.items() if v is not None}


def _load_from_disk(path: Path):
    datasets = _import("datasets", "datasets", "datasets directories")
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: a directory, but not one datasets' save_to_disk wrote ({exc}); pass a data "
                        f"file or a saved dataset") from None


def _dataset_rows(data, name: str, split: str | None, heldout: bool) -> Iterator[Row]:
    """The rows of a ``Dataset``, or of one split of a ``DatasetDict``."""
    if hasattr(data, "keys"):  # a DatasetDict
        names = list(data.keys())
        wanted = (split,) if split else _HELDOUT_SPLITS if heldout else _DEFAULT_SPLITS
        found = next((s for s in wanted if s in names), None)
        if found is None:
            raise DataError(f"{name}: no split {' or '.join(wanted)} (its splits: {', '.join(names)}); name one as "
                            f"{name}:SPLIT")
        data, name = data[found], f"{name}:{found}"
    elif split:
        raise DataError(f"{name}: a dataset without splits, so :{split} names nothing; drop it")
    number = 0
    for start in range(0, len(data), _BATCH):
        batch = data[start:start + _BATCH]  # columns: {name: [values]}
        for values in zip(*batch.values()):
            number += 1
            yield f"{name}:row {number}", {k: v for k, v in zip(batch, values) if v is not None}


def _cached_rows(name: str, split: str | None, heldout: bool) -> Iterator[Row]:
    """A dataset in the local ``datasets`` cache, loaded offline (its Arrow files memory-mapped)."""
    datasets = _import("datasets", "datasets", "datasets from the cache")
    with _offline(datasets):
        try:
            loaded = datasets.load_dataset(name)
        except Exception as exc:  # ConnectionError / FileNotFoundError / DatasetNotFoundError: not cached
            raise DataError(
                f"{name}: not a file, a directory, a built-in dataset or a dataset in the local datasets cache "
                f"({datasets.config.HF_DATASETS_CACHE}); lorakit reads the cache offline and never downloads: "
                f"run datasets.load_dataset({name!r}) once where the hub is reachable, or pass a file "
                f"({type(exc).__name__})") from None
    return _dataset_rows(loaded, name, split, heldout)


@contextlib.contextmanager
def _offline(datasets):
    """``datasets`` in offline mode for this call (the cache only), whatever the environment says."""
    hub = importlib.import_module("huggingface_hub.constants")
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _import(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {what} needs the {package} package: pip install 'lorakit[data]'") from None
