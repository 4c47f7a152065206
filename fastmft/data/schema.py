"""Row schema: the user's column names, label and domain vocabularies, and the one row check
(:func:`check_row`) that both the in-memory path (:func:`encode_labels`, an error naming the row)
and the streaming scorer (a reject with its reason) use, with one set of reasons."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import datasets

from .errors import DataError


class Reject(DataError):
    """One row that fails :func:`check_row`. ``reason`` is its canonical text (what a rejects file
    records); :meth:`at` adds where the row is, and the known values for an unknown label or
    domain."""

    def __init__(self, reason: str, known: list | None = None):
        super().__init__(reason)
        self.reason = reason
        self.known = known

    def at(self, where: str) -> str:
        return f"{where}: {self.reason}" + (f"; known: {self.known}" if self.known is not None else "")


def value_key(value) -> str:
    """The one lookup key of a label or domain value: 1, 1.0 and "1" are one label (command-line
    values are strings, data values may be numbers)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else json.dumps(value)


def usable_value(value) -> bool:
    """A label or domain value a row may carry: not missing or empty, not a non-finite number
    (a NaN is a missing value in Parquet and pandas), not a JSON list or object."""
    return _value_problem(value) is None


def _value_problem(value) -> str | None:
    if value is None or value == "":
        return "missing"
    if isinstance(value, float) and not math.isfinite(value):
        return f"not a finite number ({value})"
    if isinstance(value, (list, dict)):
        return f"a JSON {'list' if isinstance(value, list) else 'object'}, not a value"
    return None


@dataclass(frozen=True)
class Columns:
    """Names of the user's columns. ``text_pair`` (optional) holds the second text of sentence
    pairs (premise/hypothesis) or word pairs; ``id`` (optional) identifies rows in outputs."""

    text: str = "text"
    label: str = "label"
    domain: str = "domain"
    text_pair: str | None = None
    id: str | None = None

    def required(self) -> list[str]:
        return [c for c in (self.text, self.label, self.domain, self.text_pair, self.id) if c is not None]


class Vocab:
    """A fixed, ordered set of label or domain values and their integer ids, looked up by
    :func:`value_key`."""

    def __init__(self, values: Sequence[Any], name: str = "value"):
        self.values = list(values)
        self.name = name
        self.index = {value_key(v): i for i, v in enumerate(self.values)}
        if len(self.index) != len(self.values):
            raise ValueError(f"{name} vocabulary has duplicate values: {self.values}")

    @classmethod
    def from_values(cls, values: Iterable, name: str = "value") -> "Vocab":
        """The distinct usable values (:func:`usable_value`; one per key, the first seen), sorted
        (numbers numerically, strings alphabetically)."""
        distinct: dict = {}
        for v in values:
            if usable_value(v):
                distinct.setdefault(value_key(v), v)
        try:
            return cls(sorted(distinct.values()), name)
        except TypeError:
            raise DataError(
                f"{name} values mix types and cannot be ordered: {sorted(map(repr, distinct.values()))}"
            ) from None

    def get(self, value) -> int | None:
        """The id of ``value``, or None when it is not in the vocabulary."""
        try:
            return self.index.get(value_key(value))
        except TypeError:  # not JSON-serialisable
            return None

    def encode(self, value, row: int | None = None) -> int:
        i = self.get(value)
        if i is None:
            where = f" in row {row}" if row is not None else ""
            raise ValueError(f"unknown {self.name} {value!r}{where}; known: {self.values}")
        return i

    def __len__(self) -> int:
        return len(self.values)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.values == other.values

    def __repr__(self) -> str:
        return f"Vocab({self.name}: {self.values})"

    def to_json(self) -> str:
        return json.dumps(self.values)

    @classmethod
    def from_json(cls, text: str, name: str = "value") -> "Vocab":
        return cls(json.loads(text), name)


def check_columns(data, columns: Columns, *, source: str = "the data", sampled_rows: int | None = None) -> None:
    """Every column ``columns`` names exists in ``data`` (a ``datasets.Dataset`` or column names);
    else a DataError naming the missing ones. ``sampled_rows``: the names were read from that many
    first rows of a JSON file."""
    present = data.column_names if isinstance(data, datasets.Dataset) else sorted(data)
    missing = [c for c in columns.required() if c not in present]
    if missing:
        what = f"no field in its first {sampled_rows} rows named" if sampled_rows else "no column"
        raise DataError(f"{source} has {what} {', '.join(map(repr, missing))}; its columns are {present}")


@dataclass(frozen=True)
class CheckedRow:
    text: str
    text_pair: str | None
    label: int
    domain: int
    id: str | None  # the id column's value_key; None without an id column


def check_row(row: Mapping, columns: Columns, labels: Vocab, domains: Vocab) -> CheckedRow:
    """The row's text(s), label and domain ids and id, or :class:`Reject` with the reason: a
    missing or blank text, a missing label, domain or id, a JSON list or object as a label or
    domain, a value outside the vocabulary."""
    text = row.get(columns.text)
    if not isinstance(text, str) or not text.strip():
        raise Reject(f"missing text ({columns.text!r})")
    pair = None
    if columns.text_pair:
        pair = row.get(columns.text_pair)
        if not isinstance(pair, str) or not pair.strip():
            raise Reject(f"missing text pair ({columns.text_pair!r})")
    ids = []
    for column, vocab in ((columns.label, labels), (columns.domain, domains)):
        v = row.get(column)
        problem = _value_problem(v)
        if problem == "missing":
            raise Reject(f"missing {vocab.name} ({column!r})")
        if problem:
            raise Reject(f"{vocab.name} ({column!r}) is {problem}")
        i = vocab.get(v)
        if i is None:
            raise Reject(f"unknown {vocab.name} {v!r}", known=vocab.values)
        ids.append(i)
    rid = None
    if columns.id:
        rid = row.get(columns.id)
        if rid is None or rid == "":
            raise Reject(f"missing id ({columns.id!r})")
        rid = value_key(rid)
    return CheckedRow(text, pair, ids[0], ids[1], rid)


def encode_labels(
    ds: datasets.Dataset,
    columns: Columns,
    label_vocab: Vocab | None = None,
    domain_vocab: Vocab | None = None,
) -> tuple[datasets.Dataset, Vocab, Vocab]:
    """Add integer columns ``labels`` and ``domains`` (vocabularies built from the data when not
    given). Every row goes through :func:`check_row` first: a bad one raises :class:`DataError`
    (a ValueError) with its row number and the reason, which names the column."""
    check_columns(ds, columns)
    values = {c: ds[c] for c in columns.required()}
    label_vocab = label_vocab or Vocab.from_values(values[columns.label], "label")
    domain_vocab = domain_vocab or Vocab.from_values(values[columns.domain], "domain")
    labels, domains = [], []
    for i in range(len(ds)):
        try:
            checked = check_row({c: v[i] for c, v in values.items()}, columns, label_vocab, domain_vocab)
        except Reject as rej:
            raise DataError(rej.at(f"row {i}")) from None
        labels.append(checked.label)
        domains.append(checked.domain)
    ds = ds.remove_columns([c for c in ("labels", "domains") if c in ds.column_names])
    ds = ds.add_column("labels", labels).add_column("domains", domains)
    return ds, label_vocab, domain_vocab
