"""Input sources: JSONL/JSON, CSV and Parquet files (paths, globs or lists), saved datasets, or a
``datasets.Dataset`` passed through."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

import datasets

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _files(source: str | os.PathLike | Sequence[str]) -> list[str]:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        if not matches:
            raise FileNotFoundError(f"no file matches {item!r}")
        files.extend(matches)
    return files


def load_table(
    source, *, format: str | None = None, split: str | None = None, split_column: str = "split"
) -> datasets.Dataset:
    """Load rows from JSONL/JSON, CSV or Parquet files (a path, a glob, or a list of them), from a
    dataset saved with ``save_to_disk``, or pass a ``datasets.Dataset`` through. ``split`` keeps
    only the rows whose ``split_column`` equals it."""
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, datasets.DatasetDict):
        raise TypeError("got a DatasetDict: pass one of its splits, e.g. data['train']")
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        ds = datasets.load_from_disk(str(source))
        if isinstance(ds, datasets.DatasetDict):
            raise TypeError(f"{source} holds a DatasetDict ({list(ds)}): pass the folder of one split")
    else:
        files = _files(source)
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"no such file: {f}")
        kind = format
        if kind is None:
            suffixes = {Path(f).suffix.lower() for f in files}
            kinds = {_FORMATS.get(s) for s in suffixes}
            if None in kinds or len(kinds) != 1:
                raise ValueError(
                    f"cannot tell the format of {files}: use .jsonl, .json, .csv or .parquet, or pass format="
                )
            kind = kinds.pop()
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    if split is not None:
        if split_column not in ds.column_names:
            raise ValueError(f"split={split!r} given but the data has no column {split_column!r}")
        ds = ds.filter(lambda s: s == split, input_columns=split_column)
        if len(ds) == 0:
            raise ValueError(f"no row has {split_column} == {split!r}")
    return ds
