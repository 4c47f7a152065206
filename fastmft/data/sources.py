"""Input sources: JSONL/JSON, CSV and Parquet files (paths, globs or lists), saved datasets, or a
``datasets.Dataset`` passed through. One resolution of paths and globs (:func:`resolve_inputs`)
serves both :func:`load_table` (all rows at once, as a ``datasets.Dataset``) and the streaming
readers (:func:`iter_records`, :func:`count_rows`, :func:`column_names`), which hold one row at a
time.

Row numbering of the streaming readers: ``line`` is the 1-based line number for JSONL and CSV (the
header is line 1), the 1-based element number of a ``.json`` array, and the 1-based row number for
Parquet and saved datasets. Blank JSONL lines are skipped and are not rows."""

from __future__ import annotations

import codecs
import csv
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets

from .schema import DataError, Reject

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
UNDECODABLE = "undecodable line"
_READ_ROWS = 4096  # rows per Parquet / saved-dataset read


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # json | csv | parquet | dataset


def resolve_inputs(inputs: str | os.PathLike | Sequence[str], format: str | None = None) -> list[Source]:
    """Files (globs expanded, sorted) or saved-dataset folders, in the order given. ``format``
    (json, csv or parquet) overrides the file suffix."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    sources: list[Source] = []
    for item in map(str, items):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"no file matches {item!r}")
        for m in matches:
            if Path(m).is_dir():
                sources.append(Source(m, "dataset"))
                continue
            if not Path(m).is_file():
                raise FileNotFoundError(f"no such file: {m}")
            kind = format or FORMATS.get(Path(m).suffix.lower())
            if kind is None:
                raise DataError(
                    f"cannot tell the format of {m}: use .jsonl, .json, .csv or .parquet, or give the format"
                )
            sources.append(Source(m, kind))
    if not sources:
        raise DataError("no input")
    return sources


def _load_saved(path: str) -> datasets.Dataset:
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds a DatasetDict ({list(ds)}): pass the folder of one split")
    return ds


def load_table(
    source, *, format: str | None = None, split: str | None = None, split_column: str = "split"
) -> datasets.Dataset:
    """Load rows from JSONL/JSON, CSV or Parquet files (a path, a glob, or a list of them, all of
    one format), from a dataset saved with ``save_to_disk``, or pass a ``datasets.Dataset``
    through. ``split`` keeps only the rows whose ``split_column`` equals it."""
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, datasets.DatasetDict):
        raise TypeError("got a DatasetDict: pass one of its splits, e.g. data['train']")
    else:
        sources = resolve_inputs(source, format)
        kinds = sorted({s.kind for s in sources})
        if kinds == ["dataset"] and len(sources) == 1:
            ds = _load_saved(sources[0].path)
        elif len(kinds) == 1 and kinds != ["dataset"]:
            ds = datasets.load_dataset(kinds[0], data_files=[s.path for s in sources], split="train")
        else:
            raise DataError(f"load_table reads one file format or one saved dataset at a time, got {kinds}")
    if split is not None:
        if split_column not in ds.column_names:
            raise DataError(f"split={split!r} given but the data has no column {split_column!r}")
        ds = ds.filter(lambda s: s == split, input_columns=split_column)
        if len(ds) == 0:
            raise DataError(f"no row has {split_column} == {split!r}")
    return ds


def iter_records(src: Source, fields: Sequence[str]) -> Iterator[tuple[int, Any]]:
    """(line, payload) per row of one source, one row in memory at a time. Payloads go through
    :func:`decode_record`: JSONL payloads are the raw bytes (parsed only when decoded, so rows a
    caller skips are never parsed), the others dicts of (at least) ``fields`` or the reject reason
    of an undecodable row."""
    if src.kind == "json":
        if _is_json_array(src.path):
            with open(src.path, "rb") as f:
                try:
                    rows = json.loads(f.read().decode("utf-8-sig"))
                except (UnicodeDecodeError, ValueError) as err:
                    raise DataError(f"{src.path} is not valid JSON: {err}") from None
            yield from ((n, row if isinstance(row, dict) else "not a JSON object") for n, row in enumerate(rows, 1))
            return
        with open(src.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if n == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8) :]
                if line.strip():
                    yield n, line
    elif src.kind == "csv":
        with open(src.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for values in reader:
                line, start = start, reader.line_num + 1
                if not values:
                    continue
                if any("\udc80" <= ch <= "\udcff" for v in values for ch in v):
                    yield line, UNDECODABLE
                    continue
                yield line, dict(zip(header, values))
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(src.path)
        present = [c for c in fields if c in pf.schema_arrow.names]
        n = 0
        for batch in pf.iter_batches(batch_size=_READ_ROWS, columns=present):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    elif src.kind == "dataset":
        ds = _load_saved(src.path)
        present = [c for c in fields if c in ds.column_names]
        n = 0
        for batch in ds.select_columns(present).iter(batch_size=_READ_ROWS):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                n += 1
                yield n, dict(zip(keys, values))
    else:
        raise DataError(f"unknown format {src.kind!r}")


def _is_json_array(path: str) -> bool:
    """A .json file holding one JSON array (rather than JSON lines)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    return head.startswith(b"[")


def decode_record(payload) -> dict:
    """The row of a payload of :func:`iter_records`, or :class:`Reject` (undecodable line, not a
    JSON object)."""
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, str):
        raise Reject(payload)
    try:
        row = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Reject(UNDECODABLE) from None
    if not isinstance(row, dict):
        raise Reject("not a JSON object")
    return row


def count_rows(src: Source) -> int:
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(src.path).metadata.num_rows
    if src.kind == "dataset":
        return len(_load_saved(src.path))
    return sum(1 for _ in iter_records(src, []))


SAMPLE_ROWS = 1000  # rows of a JSON input read for its field names


def column_names(src: Source) -> set:
    """The input's columns; for JSON, the fields found in its first :data:`SAMPLE_ROWS` rows."""
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        return set(pq.ParquetFile(src.path).schema_arrow.names)
    if src.kind == "dataset":
        return set(_load_saved(src.path).column_names)
    if src.kind == "csv":
        with open(src.path, encoding="utf-8-sig", errors="replace", newline="") as f:
            return set(next(csv.reader(f), []))
    names: set = set()
    for n, (_, payload) in enumerate(iter_records(src, [])):
        if n >= SAMPLE_ROWS:
            break
        try:
            names.update(decode_record(payload))
        except Reject:
            continue
    return names
