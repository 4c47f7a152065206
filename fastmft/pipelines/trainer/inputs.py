"""The trainer's data: training and evaluation rows loaded, checked, encoded and tokenised once
(:func:`load_data`), the few-shot subset, and the row dicts the loop batches."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Sequence

from fastmft.data import MAX_LENGTH, MODEL_INPUTS, Columns, Vocab, check_columns, encode_labels, load_table, tokenize


@dataclass
class TrainData:
    """Tokenised train and evaluation sets with integer ``labels`` and ``domains``."""

    train: Any  # datasets.Dataset
    eval: Any
    label_vocab: Vocab
    domain_vocab: Vocab
    columns: Columns
    dev: Any = None  # optional second evaluation set (a dev split), scored beside ``eval``


def _split(ds, split: str | None, split_column: str, what: str):
    """The rows of ``split``; all rows when no split is asked for or the data has no split column
    (separate evaluation data need not carry one)."""
    if split is None or split_column not in ds.column_names:
        return ds
    try:
        return load_table(ds, split=split, split_column=split_column)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _check_domains(ds, columns: Columns, what: str) -> None:
    for row, value in enumerate(ds[columns.domain]):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{what}, row {row}: column {columns.domain!r} is empty ({value!r})")


def few_shot_rows(labels: Sequence[int], domains: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a stratified ``fraction`` of every (domain, label) cell (at least one row per
    non-empty cell), the same for the same seed; sorted."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (y, k) in enumerate(zip(labels, domains)):
        cells.setdefault((k, y), []).append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for key in sorted(cells):
        rows = cells[key]
        keep.extend(rng.sample(rows, max(1, round(len(rows) * fraction))))
    return sorted(keep)


def load_data(
    source,
    tokenizer,
    columns: Columns = Columns(),
    *,
    eval_source=None,
    train_split: str | None = "train",
    eval_split: str | None = "test",
    split_column: str = "split",
    max_length: int = MAX_LENGTH,
    pair_join: bool = False,
    few_shot: float = 1.0,
    seed: int = 0,
) -> TrainData:
    """Load, check, encode and tokenise the train and evaluation data.

    ``source`` (files, glob, saved dataset or ``datasets.Dataset``) gives the training rows: those
    whose ``split_column`` equals ``train_split`` when the column exists. The evaluation rows come
    from ``eval_source`` when given, else from ``source`` with ``split_column == eval_split``.
    Labels and domains are the training set's; every problem (a missing column, an empty text,
    label or domain, a label or domain unknown to the training set, a domain without evaluation
    rows) is a ValueError that names the column and the row or the domain."""
    train = load_table(source)
    check_columns(train, columns)
    if eval_source is None:
        if split_column not in train.column_names:
            raise ValueError(
                f"the data has no column {split_column!r} to tell training from evaluation rows; "
                f"add one or pass separate evaluation data (its columns are {train.column_names})"
            )
        evaluation = _split(train, eval_split, split_column, "evaluation data")
    else:
        evaluation = _split(load_table(eval_source), eval_split, split_column, "evaluation data")
        check_columns(evaluation, columns)
    train = _split(train, train_split, split_column, "training data")
    for ds, what in ((train, "training data"), (evaluation, "evaluation data")):
        _check_domains(ds, columns, what)
    if pair_join and columns.text_pair:
        sep = tokenizer.sep_token or "[SEP]"

        def join(batch):
            return {columns.text: [f"{a} {sep} {b}" for a, b in zip(batch[columns.text], batch[columns.text_pair])]}

        for ds in (train, evaluation):  # check emptiness before joining hides it
            encode_labels(ds, columns)
        train, evaluation = train.map(join, batched=True), evaluation.map(join, batched=True)
        columns = dataclasses.replace(columns, text_pair=None)
    try:
        train, label_vocab, domain_vocab = encode_labels(train, columns)
    except ValueError as err:
        raise ValueError(f"training data: {err}") from None
    try:
        evaluation, _, _ = encode_labels(evaluation, columns, label_vocab, domain_vocab)
    except ValueError as err:
        raise ValueError(f"evaluation data: {err}") from None
    missing = sorted(set(range(len(domain_vocab))) - set(evaluation["domains"]))
    if missing:
        names = [domain_vocab.values[k] for k in missing]
        raise ValueError(
            f"domain(s) {names} have training rows but no evaluation rows: the evaluation data would leave them empty"
        )
    if few_shot < 1.0:
        train = train.select(few_shot_rows(train["labels"], train["domains"], few_shot, seed))
    train = tokenize(train, tokenizer, columns, max_length=max_length)
    evaluation = tokenize(evaluation, tokenizer, columns, max_length=max_length)
    return TrainData(train, evaluation, label_vocab, domain_vocab, columns)


def model_rows(ds) -> list[dict]:
    """The rows as dicts of what a model batch takes: the tokenizer's outputs, labels and domains."""
    wanted = [c for c in (*MODEL_INPUTS, "labels", "domains") if c in ds.column_names]
    return ds.select_columns(wanted).to_list()
