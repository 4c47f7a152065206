"""Tokenising and batching: tokenisation without padding, one padding collate, and a
length-bucketed batch sampler (used by the trainer, the in-memory typicality pass and the streaming
scorer alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import datasets
import torch
from torch.utils.data import Sampler

from . import MAX_LENGTH
from .schema import Columns, Vocab, encode_labels
from .sources import load_table

# The tokenizer outputs a BERT-style encoder takes, in the order the collate pads them.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZE_ROWS = 256  # rows per tokenizer call


def stream_seed(seed: int, index: int, step: int | None = None) -> int:
    """The seed of one random stream derived from a run's ``seed``: ``seed * 1_000_003 + index``,
    plus ``index * 10_007 + step`` in place of ``index`` when ``step`` is given (a phase and its
    step), modulo 2^63 - 1. The odd multipliers keep nearby (seed, index) pairs apart."""
    offset = index if step is None else index * 10_007 + step
    return (seed * 1_000_003 + offset) % (2**63 - 1)


def tokenize_texts(
    tokenizer, texts: list[str], pairs: list[str] | None = None, *, max_length: int, attention_mask: bool = True
) -> dict[str, list]:
    """Token ids (and token_type_ids when the tokenizer makes them, attention_mask unless
    ``attention_mask`` is False) of each text or (text, pair), truncated to ``max_length``,
    unpadded, plus ``length``. The tokenizer runs on slices of :data:`TOKENIZE_ROWS` rows: its
    encodings of many rows at once (tokens, offsets, ...) would hold ~40 KB per row."""
    want_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"])
    out: dict[str, list] = {"input_ids": []}
    for s in range(0, len(texts), TOKENIZE_ROWS):
        enc = tokenizer(
            texts[s : s + TOKENIZE_ROWS],
            None if pairs is None else pairs[s : s + TOKENIZE_ROWS],
            truncation=True,
            max_length=max_length,
            return_attention_mask=attention_mask,
            return_token_type_ids=want_tt,
        )
        for key in MODEL_INPUTS:
            if key in enc:
                out.setdefault(key, []).extend(enc[key])
        del enc
    out["length"] = [len(ids) for ids in out["input_ids"]]
    return out


def tokenize(
    ds: datasets.Dataset, tokenizer, columns: Columns, *, max_length: int = MAX_LENGTH, num_proc: int | None = None
) -> datasets.Dataset:
    """Tokenise with ``.map(batched=True)`` (:func:`tokenize_texts`), truncating to ``max_length``
    and without padding (the collate pads per batch). Adds input_ids, attention_mask
    (token_type_ids when the tokenizer makes them) and ``length``."""

    def encode(batch):
        pair = batch[columns.text_pair] if columns.text_pair else None
        return tokenize_texts(tokenizer, batch[columns.text], pair, max_length=max_length)

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
    max_length: int = MAX_LENGTH,
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

    Keeps input_ids, attention_mask (1 over each row's ids when the rows carry none),
    token_type_ids (when present), labels, domains and the optional float column ``typicality``;
    other columns are dropped."""

    PADDED = MODEL_INPUTS
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
        if "attention_mask" not in batch:
            lengths = torch.tensor([len(r["input_ids"]) for r in rows])
            batch["attention_mask"] = (torch.arange(longest) < lengths[:, None]).long()
        for key, dtype in self.SCALARS.items():
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=dtype)
        return batch


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length for throughput, still random: shuffle all indices, cut them into
    windows of ``window_batches`` batches, sort each window by length (``longest_first``: longest
    first, so that the first batch sizes the allocator's buffers), cut into batches, and shuffle
    the batch order. ``set_epoch`` changes the order deterministically; with
    ``num_replicas`` > 1 each rank takes every num_replicas-th batch (the batch count is padded by
    repeating batches so that all ranks get the same number)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        window_batches: int = 50,
        shuffle: bool = True,
        longest_first: bool = False,
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
        self.longest_first = longest_first
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        batches = []
        for s in range(0, n, self.window):
            window = order[s : s + self.window]
            key = -self.lengths[window] if self.longest_first else self.lengths[window]
            window = window[torch.argsort(key, stable=True)]
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


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, longest] of token-id lists, right-padded with pad_id."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
