"""Multi-domain data on Hugging Face ``datasets``: loading with user-named columns, label and
domain vocabularies, tokenisation, padding collate and a length-bucketed batch sampler."""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import datasets
import torch
from torch.utils.data import Sampler

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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


def tokenize(
    ds: datasets.Dataset, tokenizer, columns: Columns, *, max_length: int = 128, num_proc: int | None = None
) -> datasets.Dataset:
    """Tokenise with ``.map(batched=True)``, truncating to ``max_length`` and without padding (the
    collate pads per batch). Adds input_ids, attention_mask (token_type_ids when the tokenizer
    makes them) and ``length``."""

    def encode(batch):
        pair = batch[columns.text_pair] if columns.text_pair else None
        enc = tokenizer(batch[columns.text], pair, truncation=True, max_length=max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return dict(enc)

    return ds.map(encode, batched=True, num_proc=num_proc, desc="tokenising")


@dataclass(frozen=True)
class PreparedData:
    dataset: datasets.Dataset  # tokenised, with integer labels and domains
    label_vocab: Vocab
    domain_vocab: Vocab
    columns: Columns


def prepare(
    source,
    tokenizer,
    columns: Columns = Columns(),
    *,
    max_length: int = 128,
    split: str | None = None,
    label_vocab: Vocab | None = None,
    domain_vocab: Vocab | None = None,
) -> PreparedData:
    """load_table -> encode_labels -> tokenize, in one call."""
    ds = load_table(source, split=split)
    ds, label_vocab, domain_vocab = encode_labels(ds, columns, label_vocab, domain_vocab)
    return PreparedData(tokenize(ds, tokenizer, columns, max_length=max_length), label_vocab, domain_vocab, columns)


class Collator:
    """Pads a list of tokenised rows to the batch's longest sequence and stacks them as tensors.

    Keeps input_ids, attention_mask, token_type_ids (when present), labels, domains and the
    optional float column ``typicality``; other columns are dropped."""

    PADDED = ("input_ids", "attention_mask", "token_type_ids")
    SCALARS = {"labels": torch.long, "domains": torch.long, "typicality": torch.float32, "index": torch.long}

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key in self.PADDED:
            if key in rows[0]:
                pad = self.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.tensor(
                    [list(r[key]) + [pad] * (longest - len(r[key])) for r in rows], dtype=torch.long
                )
        for key, dtype in self.SCALARS.items():
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=dtype)
        return batch


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length for throughput, still random: shuffle all indices, cut them into
    windows of ``window_batches`` batches, sort each window by length, cut into batches, and
    shuffle the batch order. ``set_epoch`` changes the order deterministically; with
    ``num_replicas`` > 1 each rank takes every num_replicas-th batch (the batch count is padded by
    repeating batches so that all ranks get the same number)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        window_batches: int = 50,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, num_replicas={num_replicas})")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.window = batch_size, batch_size * max(1, window_batches)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        batches = []
        for s in range(0, n, self.window):
            window = order[s : s + self.window]
            window = window[torch.argsort(self.lengths[window], stable=True)]
            batches.extend(window[i : i + self.batch_size].tolist() for i in range(0, len(window), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.num_replicas > 1 and batches:
            per_rank = math.ceil(len(batches) / self.num_replicas)
            batches = (batches * self.num_replicas)[: per_rank * self.num_replicas][self.rank :: self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
