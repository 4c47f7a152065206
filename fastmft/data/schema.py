"""Row schema: the user's column names, label and domain vocabularies, and the row checks that
name the offending row and column."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import datasets


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
    """A fixed, ordered set of label or domain values and their integer ids.

    ``key`` maps a value to its lookup key (default: the value itself); ``fastmft score`` looks
    values up by string form, since command-line values are strings and data values may be numbers.
    """

    def __init__(self, values: Sequence[Any], name: str = "value", key: Callable[[Any], Any] | None = None):
        self.values = list(values)
        self.name = name
        self.key = key
        self.index = {(v if key is None else key(v)): i for i, v in enumerate(self.values)}
        if len(self.index) != len(self.values):
            raise ValueError(f"{name} vocabulary has duplicate values: {self.values}")

    @classmethod
    def from_values(cls, values, name: str = "value") -> "Vocab":
        """The distinct values, sorted (numbers numerically, strings alphabetically)."""
        distinct = set(v for v in values if v is not None)
        try:
            return cls(sorted(distinct), name)
        except TypeError:
            raise ValueError(f"{name} values mix types and cannot be ordered: {sorted(map(repr, distinct))}") from None

    def get(self, value) -> int | None:
        """The id of ``value``, or None when it is not in the vocabulary."""
        try:
            return self.index.get(value if self.key is None else self.key(value))
        except TypeError:  # unhashable
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


def check_columns(ds: datasets.Dataset, columns: Columns) -> None:
    missing = [c for c in columns.required() if c not in ds.column_names]
    if missing:
        raise ValueError(f"the data has no column {', '.join(map(repr, missing))}; its columns are {ds.column_names}")


def encode_labels(
    ds: datasets.Dataset,
    columns: Columns,
    label_vocab: Vocab | None = None,
    domain_vocab: Vocab | None = None,
) -> tuple[datasets.Dataset, Vocab, Vocab]:
    """Add integer columns ``labels`` and ``domains`` (vocabularies built from the data when not
    given). Every row is checked first: an empty or missing text, a missing label or domain, or a
    value outside a given vocabulary raises ValueError naming the row and column."""
    check_columns(ds, columns)
    for column in (columns.text, columns.text_pair):
        if column is None:
            continue
        for row, value in enumerate(ds[column]):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"row {row}: column {column!r} is empty or not text ({value!r})")
    encoded = {}
    for column, vocab, name in ((columns.label, label_vocab, "label"), (columns.domain, domain_vocab, "domain")):
        values = ds[column]
        for row, value in enumerate(values):
            if value is None:
                raise ValueError(f"row {row}: column {column!r} is missing")
        vocab = vocab or Vocab.from_values(values, name)
        encoded[name] = (vocab, [vocab.encode(v, row) for row, v in enumerate(values)])
    label_vocab, labels = encoded["label"]
    domain_vocab, domains = encoded["domain"]
    ds = ds.remove_columns([c for c in ("labels", "domains") if c in ds.column_names])
    ds = ds.add_column("labels", labels).add_column("domains", domains)
    return ds, label_vocab, domain_vocab
