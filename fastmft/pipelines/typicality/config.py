"""The options of the streaming pipeline (``fastmft score`` and :func:`score_files`), checked
before any work, and its summary."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fastmft.data import Columns, Source
from fastmft.runtime.files import check_writable

from .core import ScoreError


@dataclass
class ScoreConfig:
    inputs: list[str]
    output: str
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    domain_column: str = "domain"
    id_column: str | None = None
    label_values: list[str] | None = None
    domain_values: list[str] | None = None
    format: str | None = None
    backbone: str | None = None
    trust_remote_code: bool = False
    max_length: int = 256
    batch_size: int = 64
    chunk_rows: int = 4096
    alpha: float = 0.5
    prototypes: int = 1
    temperature: float = 0.1
    seed: int = 0
    precision: str | None = (
        None  # the encoder's: fp32 | bf16 | int8 (None: the device's default, fastmft.runtime.precision)
    )
    quantize: str | None = None  # the old name of precision="int8", kept as an alias
    cache_dir: str | None = None
    rejects: str | None = None
    report: str | None = None
    top_k: int = 10
    strict: bool = False
    restart: bool = False
    keep_cache: bool = False
    device: str | None = None
    threads: int | None = None
    progress: bool = True

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

    def columns(self) -> Columns:
        return Columns(self.text_column, self.label_column, self.domain_column, self.text_pair_column, self.id_column)

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(str(self.output) + ".score-cache")

    def rejects_path(self) -> Path:
        return Path(self.rejects) if self.rejects else Path(str(self.output) + ".rejects.jsonl")


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


def check_config(cfg: ScoreConfig) -> None:
    """Every setting, before any work; each error names its field (the command line shows the flag)."""
    for option, value, low in (
        ("batch_size", cfg.batch_size, 1),
        ("chunk_rows", cfg.chunk_rows, 1),
        ("prototypes", cfg.prototypes, 1),
        ("max_length", cfg.max_length, 2),
        ("top_k", cfg.top_k, 1),
        ("threads", cfg.threads or 1, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ScoreError(f"`{option}` must be an integer >= {low}, got {value!r}")
    if cfg.threads and cfg.threads > (os.cpu_count() or 1):
        raise ScoreError(f"`threads` must be at most this machine's {os.cpu_count()} CPUs, got {cfg.threads}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ScoreError(f"`alpha` must lie in [0, 1], got {cfg.alpha}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ScoreError(f"`temperature` must be a finite number > 0, got {cfg.temperature}")


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
