"""The settings of the typicality commands, checked before any work: :class:`ScoreConfig` (the
streaming pipeline, ``fastmft score`` and :func:`score_files`) and :class:`TypicalityConfig` (``fastmft
typicality``), each field declared once with its help text (fastmft.runtime.settings), from which the
commands make their options; and the summary of a streaming run. Torch-free: ``--help`` imports it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fastmft.data import MAX_LENGTH
from fastmft.data.errors import DataError
from fastmft.data.synthetic import SYNTHETIC_PER_DOMAIN
from fastmft.runtime.files import check_writable
from fastmft.runtime.settings import (
    backbone_setting,
    check_settings,
    column_settings,
    device_setting,
    precision_setting,
    progress_setting,
    quantize_setting,
    setting,
    threads_setting,
    trust_remote_code_setting,
)

if TYPE_CHECKING:
    from fastmft.data import Columns, Source


class ScoreError(DataError):
    """A problem with the input or the command (bad row under --strict, cache of another command,
    a non-finite embedding or score)."""


_ALPHA = "weight of the own-domain prototype against the other domains'"
_PROTOTYPES = "prototypes per (domain, label) cell, J"


@dataclass
class ScoreConfig:
    inputs: list[str] = setting(
        help="JSONL/CSV/Parquet files, globs of shards (quote them), or saved-dataset folders",
        positional=True,
        metavar="INPUT",
    )
    output: str = setting(help="output Parquet file: id, domain, label, typicality per accepted row", short="-o")
    text_column: str = column_settings()["text_column"]
    text_pair_column: str | None = column_settings()["text_pair_column"]
    label_column: str = column_settings()["label_column"]
    domain_column: str = column_settings()["domain_column"]
    id_column: str | None = setting(
        None,
        "row identifier, written as text (default: the input's 'id' column when it has one, else the 0-based row index)",
    )
    label_values: list[str] | None = setting(None, "comma-separated labels (default: inferred in a first cheap pass)")
    domain_values: list[str] | None = setting(None, "comma-separated domains (default: inferred in a first cheap pass)")
    format: str | None = setting(
        None, "input format (default: from the file suffix)", choices=("json", "csv", "parquet")
    )
    backbone: str | None = backbone_setting()
    trust_remote_code: bool = trust_remote_code_setting()
    # long reviews, encoded for throughput in large inference batches
    max_length: int = setting(256, "tokens per row after truncation", low=2)
    batch_size: int = setting(64, "rows per batch", low=1)
    chunk_rows: int = setting(4096, "rows per length-sorting window and cache chunk, the unit of resume", low=1)
    alpha: float = setting(0.5, _ALPHA, low=0.0, high=1.0)
    prototypes: int = setting(1, _PROTOTYPES, low=1)
    temperature: float = setting(0.1, "soft membership temperature for J > 1", low=0.0, low_open=True)
    seed: int = setting(0, "seed of the multi-prototype k-means (J > 1)")
    # fp32 | bf16 | int8 (None: the device's default, fastmft.runtime.precision)
    precision: str | None = precision_setting()
    quantize: str | None = quantize_setting()
    cache_dir: str | None = setting(None, "cache and resume folder (default: OUTPUT.score-cache)")
    rejects: str | None = setting(
        None, "rejected rows as JSON lines with file, line, reason (default: OUTPUT.rejects.jsonl)"
    )
    report: str | None = setting(None, "write the top/bottom-k rows per domain to this JSON file")
    top_k: int = setting(10, "rows per domain and end in `report`", low=1)
    strict: bool = setting(False, "a bad row is an error instead of a reject")
    restart: bool = setting(False, "discard the cache of an earlier, different command")
    keep_cache: bool = setting(False, "keep the embedding cache after success")
    device: str | None = device_setting()
    threads: int | None = threads_setting()
    progress: bool = progress_setting()

    # the fields that change the result: they key the cache
    _KEYED = (
        "text_column",
        "text_pair_column",
        "label_column",
        "domain_column",
        "id_column",
        "label_values",
        "domain_values",
        "format",
        "backbone",
        "max_length",
        "batch_size",
        "chunk_rows",
        "alpha",
        "prototypes",
        "temperature",
        "seed",
        "precision",  # resolved before the key is made: a cache never mixes precisions
        "strict",
    )

    def __post_init__(self):
        """Every setting, before any work; each error names its field (the command line shows the flag)."""
        check_settings(self, ScoreError)

    def columns(self) -> Columns:
        from fastmft.data import Columns

        return Columns(self.text_column, self.label_column, self.domain_column, self.text_pair_column, self.id_column)

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(str(self.output) + ".score-cache")

    def rejects_path(self) -> Path:
        return Path(self.rejects) if self.rejects else Path(str(self.output) + ".rejects.jsonl")


@dataclass
class TypicalityConfig:
    """``fastmft typicality``: score a corpus in memory and show its most and least typical rows."""

    data: str | None = setting(
        None,
        "JSONL/CSV/Parquet file(s) or glob, or a saved dataset folder (default: the embedded synthetic corpus)",
    )
    split: str | None = setting(None, "keep only rows whose 'split' column equals this")
    text_column: str = column_settings()["text_column"]
    text_pair_column: str | None = column_settings()["text_pair_column"]
    label_column: str = column_settings()["label_column"]
    domain_column: str = column_settings()["domain_column"]
    id_column: str | None = setting(None, "row identifier to print and save (default: the row number)")
    backbone: str | None = backbone_setting()
    trust_remote_code: bool = trust_remote_code_setting()
    alpha: float = setting(0.5, _ALPHA, low=0.0, high=1.0)
    prototypes: int = setting(1, _PROTOTYPES, low=1)
    max_length: int = setting(MAX_LENGTH, "tokens per row after truncation", low=2)
    batch_size: int = setting(32, "rows per batch", low=1)
    seed: int = setting(0, "seed of the multi-prototype k-means (J > 1)")
    precision: str | None = precision_setting()
    quantize: str | None = quantize_setting()
    top: int = setting(3, "instances to show per domain at each end", low=1)
    synthetic_per_domain: int = setting(
        SYNTHETIC_PER_DOMAIN, "rows per domain of the synthetic corpus without `data` (as fastmft train)", low=1
    )
    output: str | None = setting(None, "write {id, domain, label, typicality} per row as JSON lines")
    plot: str | None = setting(
        None, "draw the typicality distribution per domain into this PNG (needs matplotlib)", metavar="PNG"
    )
    device: str | None = device_setting()
    threads: int | None = threads_setting()
    progress: bool = progress_setting()

    def __post_init__(self):
        check_settings(self)


@dataclass
class ScoreSummary:
    rows: int = 0  # input rows (blank JSONL lines excluded)
    scored: int = 0
    rejected: int = 0
    reasons: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)
    domains: list = field(default_factory=list)
    seconds: float = 0.0
    rows_per_s: float = 0.0
    output: str = ""
    rejects: str = ""
    report: str | None = None
    resumed_chunks: int = 0
    already_complete: bool = False  # a rerun of a finished command (--keep-cache): times are the first run's
    precision: str = ""  # the encoder's precision that ran

    def text(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        timing = f"{self.seconds:.1f} s, {self.rows_per_s:.1f} rows/s"
        return (
            f"{self.rows} rows: {self.scored} scored, {self.rejected} rejected ({reasons}); "
            + (f"already complete (the first run took {timing})" if self.already_complete else timing)
            + (f", {self.resumed_chunks} chunks resumed from the cache" if self.resumed_chunks else "")
            + (
                f"\nprecision: {self.precision} encoder; pooling, prototypes and typicality in fp32"
                if self.precision
                else ""
            )
            + f"\nscores: {self.output}"
            + (f"\nrejects: {self.rejects}" if self.rejected else "")
            + (f"\nreport: {self.report}" if self.report else "")
        )


def check_outputs(cfg: ScoreConfig, sources: Sequence[Source]) -> None:
    """Before any work: every output path must be writable and none may be an input."""
    inputs = [Path(s.path) for s in sources]
    named = [("output", Path(cfg.output)), ("rejects", cfg.rejects_path())]
    if cfg.report:
        named.append(("report", Path(cfg.report)))
    for option, path in named:
        if path.is_dir():
            raise ScoreError(f"`{option}` {path} is a folder; give a file name")
        for src in inputs:
            same = path.exists() and src.exists() and os.path.samefile(path, src)
            if same or path.resolve() == src.resolve() or src.resolve() in path.resolve().parents:
                raise ScoreError(f"`{option}` {path} is an input ({src}); fastmft never overwrites its inputs")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ScoreError(f"`{option}` {path}: {parent} is a file, not a folder")
        try:
            check_writable(parent, f"`{option}` {path}: the folder")
        except ValueError as err:
            raise ScoreError(str(err)) from None
    cache = cfg.cache_path()
    for src in inputs:
        if cache.resolve() == src.resolve() or src.resolve() in cache.resolve().parents:
            raise ScoreError(f"`cache_dir` {cache} is an input or inside one ({src})")
    check_distinct_outputs([*named, ("cache_dir", cache)])


def check_distinct_outputs(named: Sequence[tuple[str, Path]]) -> None:
    """No two outputs may be one file, and none may lie in or be the cache folder (its clean-up
    would remove it): one would silently replace the other. ``named``: (field, path) pairs, the
    cache folder as ``cache_dir``."""
    seen: dict[Path, str] = {}
    cache = next((p.resolve() for name, p in named if name == "cache_dir"), None)
    for name, path in named:
        if name == "cache_dir":
            continue
        real = path.resolve()
        if real in seen:
            raise ScoreError(f"`{name}` {path} is the same file as {seen[real]}; give each output its own name")
        if cache is not None and (real == cache or cache in real.parents):
            raise ScoreError(f"`{name}` {path} is inside the cache folder {cache}; give it a path outside it")
        seen[real] = f"`{name}` {path}"
