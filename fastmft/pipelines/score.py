"""``fastmft score``: streaming, resumable, sharded typicality scoring of large corpora.

Two passes as the MFT paper defines them (prototypes from all rows, then a score per row), with the
encoder run once:

* **pass one** streams the input rows (JSONL/CSV/Parquet files, globs of shards, or a dataset saved
  with ``datasets.save_to_disk``) in *chunks* of ``chunk_rows`` consecutive input rows. A background
  thread parses, validates and tokenises (fast tokenizer) the next chunk while the encoder runs on
  the current one; each chunk is sorted by length and cut into batches (length bucketing within a
  window), the encoder runs under ``torch.inference_mode`` (bf16 on CUDA), the last layer is
  masked-mean pooled, and the chunk's embeddings go to an on-disk cache as a float32 ``.npy`` file
  (memory-mapped later) together with its per-(domain, label) prototype sums in float64, computed
  from the values that pass two reads. A non-finite embedding or score is an error naming the rows.
* **pass two** reads only the cache: prototypes = the sum of the chunk sums (all-reduced across
  ranks), typicality per chunk, then rank 0 merges the chunks in input order into one Parquet file
  with columns ``id, domain, label, typicality`` (every accepted input row exactly once, in input
  order), a rejects file (JSON lines: ``file, line, row, reason``) and optionally a small JSON report
  (per domain: rows, mean typicality, the top/bottom-k rows).

Usage: ``fastmft score data/*.jsonl --output scores.parquet [--label-values neg,pos]
[--id-column id] [--report report.json] [--prototypes 3]``; the same as ``python -m fastmft score``
(what ``torchrun --nproc_per_node N -m fastmft score ...`` runs), and from Python
:func:`score_files` with a :class:`ScoreConfig`.

Memory: at most a few chunks (rows, tokens, embeddings) are held at any time, so peak memory does
not depend on the number of rows (the multi-prototype option is the exception: see below).

Resume: every cache file is written to a unique temporary name and renamed into place; a chunk
counts as done once its metadata file exists (renamed last). The cache folder (default
``<output>.score-cache/``, marked as fastmft's and locked while a run uses it) holds
``manifest.json`` keyed by the command's arguments and the inputs' paths and content hashes. A
non-empty folder without fastmft's marker is refused, and only fastmft's own file names are ever
removed; after success (without ``--keep-cache``) the cache folder is removed. Rerunning the same command after a crash (``kill -9``
anywhere) skips the done chunks and produces the same output as an uninterrupted run; chunk
boundaries do not depend on the number of processes, so a resumed run may even use another world
size. A different command on the same cache folder is an error (``--restart`` discards the cache).

Vocabularies: ``--label-values``/``--domain-values`` fix them (rows with other values are
rejected); otherwise they are inferred in a first cheap pass that reads only the label and domain
fields (sorted distinct values, as :meth:`fastmft.data.Vocab.from_values`). Values given on the
command line match the data by their string form (``--label-values 0,1`` matches JSON ``0``).

Row numbering: ``line`` in rejects is the 1-based line number for JSONL and CSV (the header is
line 1), the 1-based row number for Parquet and saved datasets. Blank JSONL lines are skipped and
are not rows. Ids are written as text: the ``--id-column`` value, else the input's own ``id``
column when every input has one, else the 0-based index of the row in the whole input (all files
in order, rejected rows included).

Multi-node / multi-process (``torchrun``): chunk c belongs to rank c mod world_size; each rank
encodes its chunks, the prototype sums are all-reduced (:meth:`PrototypeAccumulator.all_reduce`),
each rank scores its chunks and rank 0 merges. The cache folder must be visible to all ranks (a
shared filesystem on several nodes).

Multi-prototype (``--prototypes J`` > 1): spherical k-means per (domain, label) cell
(:func:`fastmft.ops.prototypes.multi_prototypes`, seeded with ``seed`` + cell index) on the cached
embeddings, loaded one cell at a time; peak memory then grows with the largest cell (rows x dim x 4
bytes).
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import heapq
import json
import math
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from fastmft.runtime.files import atomic_json as _atomic_json
from fastmft.runtime.files import atomic_write as _atomic_write

if TYPE_CHECKING:
    from fastmft.data import Vocab
    from fastmft.runtime.dist import Dist

_TOKENIZE_ROWS = 256  # rows per tokenizer call
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CACHE_VERSION = 2  # 2: float32 embeddings, text ids, content-hashed inputs


class ScoreError(ValueError):
    """A problem with the input or the command (bad row under --strict, cache of another command)."""


# ----------------------------------------------------------------------------------------------
# Crash injection (tests): FASTMFT_SCORE_CRASH="point:n" kills the process with SIGKILL the n-th
# time ``point`` is reached; points: batch, chunk-write, score, merge. ``CRASH_HOOK`` (a callable
# taking the point name) is called first, for in-process tests.

CRASH_HOOK: Callable[[str], None] | None = None
_crash_counts: dict[str, int] = {}


def _crash_point(name: str) -> None:
    if CRASH_HOOK is not None:
        CRASH_HOOK(name)
    spec = os.environ.get("FASTMFT_SCORE_CRASH")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(n or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Configuration


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
    quantize: str | None = None  # None | "int8" (CPU: dynamic int8 quantisation of nn.Linear)
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
        "quantize",
        "strict",
    )

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

    def text(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        timing = f"{self.seconds:.1f} s, {self.rows_per_s:.1f} rows/s"
        return (
            f"{self.rows} rows: {self.scored} scored, {self.rejected} rejected ({reasons}); "
            + (f"already complete (the first run took {timing})" if self.already_complete else timing)
            + (f", {self.resumed_chunks} chunks resumed from the cache" if self.resumed_chunks else "")
            + f"\nscores: {self.output}"
            + (f"\nrejects: {self.rejects}" if self.rejected else "")
            + (f"\nreport: {self.report}" if self.report else "")
        )


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # json | csv | parquet | dataset


def resolve_inputs(inputs: Sequence[str], format: str | None = None) -> list[Source]:
    """Files (globs expanded, sorted) or saved-dataset folders, in the order given."""
    sources: list[Source] = []
    for item in inputs:
        item = str(item)
        if Path(item).is_dir():
            sources.append(Source(item, "dataset"))
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"no file matches {item!r}")
        for m in matches:
            if Path(m).is_dir():
                sources.append(Source(m, "dataset"))
                continue
            if not Path(m).is_file():
                raise FileNotFoundError(f"no such file: {m}")
            kind = format or _FORMATS.get(Path(m).suffix.lower())
            if kind is None:
                raise ScoreError(f"cannot tell the format of {m}: use .jsonl, .json, .csv or .parquet, or --format")
            sources.append(Source(m, kind))
    if not sources:
        raise ScoreError("no input")
    return sources


def _fingerprint(sources: Sequence[Source]) -> list:
    """Each input's path, format and content hash: an edit that keeps size and mtime (``cp -p``)
    still changes the key, so a resumed run never mixes cached rows of old content."""
    out = []
    for s in sources:
        p = Path(s.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.sha256()
        buf = bytearray(1 << 16)  # one small buffer: the held memory must not grow with the input
        view = memoryview(buf)
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else "").encode() + b"\0")
            with open(f, "rb") as fh:
                while n := fh.readinto(buf):
                    h.update(view[:n])
        out.append([str(p.resolve()), s.kind, h.hexdigest()])
    return out


def _check_outputs(cfg: ScoreConfig, sources: Sequence[Source]) -> None:
    """Before any work: every output path must be writable and none may be an input."""
    inputs = [Path(s.path) for s in sources]
    named = [("--output", Path(cfg.output)), ("--rejects", cfg.rejects_path())]
    if cfg.report:
        named.append(("--report", Path(cfg.report)))
    for option, path in named:
        if path.is_dir():
            raise ScoreError(f"{option} {path} is a folder; give a file name")
        for src in inputs:
            same = path.exists() and src.exists() and os.path.samefile(path, src)
            if same or path.resolve() == src.resolve() or src.resolve() in path.resolve().parents:
                raise ScoreError(f"{option} {path} is an input ({src}); fastmft never overwrites its inputs")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ScoreError(f"{option} {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ScoreError(f"{option} {path}: the folder {parent} is not writable")
    cache = cfg.cache_path()
    for src in inputs:
        if cache.resolve() == src.resolve() or src.resolve() in cache.resolve().parents:
            raise ScoreError(f"--cache-dir {cache} is an input or inside one ({src})")


class _Reject(Exception):
    pass


_UNDECODABLE = "undecodable line"


def _raw_records(src: Source, fields: list[str]) -> Iterator[tuple[int, Any]]:
    """(line, payload) per row of one source. JSONL payloads are the raw bytes (parsed lazily by
    :func:`_decode` so that rows of other ranks are never parsed); others are dicts (or a reject
    reason string for an undecodable CSV line)."""
    if src.kind == "json":
        if _is_json_array(src.path):
            with open(src.path, "rb") as f:
                try:
                    rows = json.loads(f.read().decode("utf-8-sig"))
                except (UnicodeDecodeError, ValueError) as err:
                    raise ScoreError(f"{src.path} is not valid JSON: {err}") from None
            # a .json array: "line" is the 1-based element number
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
                    yield line, _UNDECODABLE
                    continue
                yield line, dict(zip(header, values))
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(src.path)
        present = [c for c in fields if c in pf.schema_arrow.names]
        n = 0
        for batch in pf.iter_batches(batch_size=4096, columns=present):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    elif src.kind == "dataset":
        import datasets

        ds = datasets.load_from_disk(src.path)
        if isinstance(ds, datasets.DatasetDict):
            raise ScoreError(f"{src.path} holds a DatasetDict ({list(ds)}): pass the folder of one split")
        present = [c for c in fields if c in ds.column_names]
        n = 0
        for batch in ds.select_columns(present).iter(batch_size=4096):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                n += 1
                yield n, dict(zip(keys, values))
    else:
        raise ScoreError(f"unknown format {src.kind!r}")


def _is_json_array(path: str) -> bool:
    """A .json file holding one JSON array (rather than JSON lines)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    return head.startswith(b"[")


def _decode(payload) -> dict:
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, str):
        raise _Reject(payload)
    try:
        row = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Reject(_UNDECODABLE) from None
    if not isinstance(row, dict):
        raise _Reject("not a JSON object")
    return row


def _count_rows(src: Source) -> int:
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(src.path).metadata.num_rows
    if src.kind == "dataset":
        import datasets

        return len(datasets.load_from_disk(src.path))
    return sum(1 for _ in _raw_records(src, []))


def _key(value) -> str:
    """One lookup key per value, the same for inference and lookup: 1, 1.0 and "1" are one label."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else json.dumps(value)


def _vocab(values: list, name: str) -> Vocab:
    """A vocabulary looked up by string form (CLI values are strings, data values may be numbers)."""
    if not values:
        raise ScoreError(f"no {name} value found in the input")
    from fastmft.data import Vocab

    try:
        return Vocab(values, name, key=_key)
    except ValueError as e:
        raise ScoreError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Cache files


# Every name fastmft writes in a cache folder (and the temporary names atomic_write derives from
# them): the only files it ever deletes there.
_MARKER = ".fastmft-score-cache"
_LOCK = ".lock"
_OWN_NAME = re.compile(
    r"^\.?(chunk-\d{7}\.(emb\.npy|meta\.npz|scores\.npy)|prototypes\.pt|manifest\.json|merge-temps\.json)"
    r"(\.[^/]*\.tmp)?$"
)


def _discard_cache(cache: Path) -> None:
    """Remove this cache's files (never the folder's other content, nor the marker and lock)."""
    for f in cache.iterdir():
        if _OWN_NAME.match(f.name) and f.is_file():
            f.unlink(missing_ok=True)


def _open_cache(cache: Path):
    """Create or adopt the cache folder and lock it; returns the open lock file (kept open for the
    run). A non-empty folder without fastmft's marker is refused: it is someone else's."""
    import fcntl

    if cache.exists() and not cache.is_dir():
        raise ScoreError(f"--cache-dir {cache} is a file, not a folder")
    if cache.is_dir() and not (cache / _MARKER).is_file() and any(cache.iterdir()):
        raise ScoreError(
            f"--cache-dir {cache} is a non-empty folder that is not a fastmft score cache; "
            "fastmft will not write into it or delete from it: pass an empty or new folder"
        )
    cache.mkdir(parents=True, exist_ok=True)
    (cache / _MARKER).touch()
    lock = open(cache / _LOCK, "a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ScoreError(
            f"another fastmft score run is using the cache {cache}; wait for it to finish "
            "or pass another --output/--cache-dir"
        ) from None
    return lock


def _close_cache(cache: Path, lock, keep: bool) -> None:
    """After success without --keep-cache: remove the cache's files, then the folder if it is empty."""
    if not keep:
        _discard_cache(cache)
        for name in (_MARKER, _LOCK):
            (cache / name).unlink(missing_ok=True)
    lock.close()
    if not keep:
        try:
            cache.rmdir()
        except OSError:  # not empty: something else lives there now
            pass


def _emb_path(cache: Path, c: int) -> Path:
    return cache / f"chunk-{c:07d}.emb.npy"


def _meta_path(cache: Path, c: int) -> Path:
    return cache / f"chunk-{c:07d}.meta.npz"


def _scores_path(cache: Path, c: int) -> Path:
    return cache / f"chunk-{c:07d}.scores.npy"


def _load_meta(cache: Path, c: int) -> dict:
    with np.load(_meta_path(cache, c), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------
# The scorer


@dataclass
class _Chunk:
    index: int
    rows: list  # global row index of accepted rows
    ids: list
    labels: list
    domains: list
    texts: list
    pairs: list | None
    rejects: list  # dicts {file, line, reason}
    n_input: int = 0
    batches: list = field(default_factory=list)  # (positions, input tensors)


def _load_model(cfg: ScoreConfig, device, model=None, tokenizer=None):
    import torch

    ours = model is None or tokenizer is None
    if ours:
        from fastmft.runtime.backbone import load_backbone

        model, tokenizer = load_backbone(cfg.backbone, trust_remote_code=cfg.trust_remote_code)
    from fastmft.runtime.backbone import check_max_length

    check_max_length(model, cfg.max_length)
    if not getattr(tokenizer, "is_fast", False):
        print(
            "fastmft score: warning: the tokenizer is not a fast (Rust) tokenizer; tokenisation will be slow",
            file=sys.stderr,
        )
    model.eval()
    if cfg.quantize == "int8":
        if device.type != "cpu":
            raise ScoreError("--quantize int8 is a CPU mode")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=ours)
    elif cfg.quantize:
        raise ScoreError(f"unknown --quantize {cfg.quantize!r} (int8)")
    if device.type == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    else:
        model = model.to(device)
    return model, tokenizer


def score_files(cfg: ScoreConfig, *, model=None, tokenizer=None) -> ScoreSummary:
    """Run ``fastmft score`` with ``cfg`` (the Python API). ``model``/``tokenizer`` override the
    backbone (the cache key then uses ``cfg.backbone`` as given). Returns the summary (on every
    rank; the files are written by rank 0)."""
    import torch

    t0 = time.perf_counter()
    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from fastmft.runtime.dist import Dist

    dist = Dist(cfg.device)
    try:
        summary = _run(cfg, dist, model, tokenizer, t0)
        # Every rank done before any rank leaves the group: a rank that tore down its gloo pairs
        # while its peer still exchanged was seen to abort (1 run in about 8, under load).
        dist.barrier()
        return summary
    finally:
        dist.close()


def _check_config(cfg: ScoreConfig) -> None:
    """Every option, before any work; each error names its option."""
    for option, value, low in (
        ("--batch-size", cfg.batch_size, 1),
        ("--chunk-rows", cfg.chunk_rows, 1),
        ("--prototypes", cfg.prototypes, 1),
        ("--max-length", cfg.max_length, 2),
        ("--top-k", cfg.top_k, 1),
        ("--threads", cfg.threads or 1, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ScoreError(f"{option} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ScoreError(f"--alpha must lie in [0, 1], got {cfg.alpha}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ScoreError(f"--temperature must be a finite number > 0, got {cfg.temperature}")


def _run(cfg: ScoreConfig, dist: Dist, model, tokenizer, t0: float) -> ScoreSummary:
    sources = resolve_inputs(cfg.inputs, cfg.format)
    _check_outputs(cfg, sources)
    cache = cfg.cache_path()
    lock = _open_cache(cache) if dist.rank == 0 else None
    try:
        summary = _run_locked(cfg, dist, model, tokenizer, t0, sources, cache)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    if lock is not None:
        _close_cache(cache, lock, cfg.keep_cache)
    return summary


def _run_locked(
    cfg: ScoreConfig, dist: Dist, model, tokenizer, t0: float, sources: list[Source], cache: Path
) -> ScoreSummary:
    device = dist.device
    key_obj = {
        "version": CACHE_VERSION,
        "inputs": _fingerprint(sources),
        "args": {k: getattr(cfg, k) for k in ScoreConfig._KEYED},
    }
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True, default=str).encode()).hexdigest()

    # --- manifest: rank 0 checks or creates it, and runs the cheap counting / vocabulary pass
    if dist.rank == 0:
        manifest_path = cache / "manifest.json"
        manifest = None
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("status") == "complete" and not Path(cfg.output).exists() and manifest.get("key") == key:
                manifest = None  # the output was removed since: run again
            elif manifest.get("key") != key:
                if not cfg.restart:
                    raise ScoreError(
                        f"the cache {cache} belongs to a different command or changed inputs; rerun with --restart "
                        "to discard it, or pass another --cache-dir"
                    )
                manifest = None
            elif cfg.restart:
                manifest = None
        if manifest is None:
            _discard_cache(cache)
            manifest = {"key": key, "command": key_obj, "status": "started"}
            manifest.update(_scan(sources, cfg))
            _atomic_json(manifest_path, manifest)
        state = manifest
    else:
        state = None
    state = dist.broadcast_obj(state)
    if state.get("status") == "complete" and Path(cfg.output).exists():
        summary = ScoreSummary(**state["summary"])
        summary.already_complete = True
        return summary
    cfg = replace(cfg, id_column=state["id_column"])
    columns = [
        c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.domain_column, cfg.id_column) if c
    ]
    labels = _vocab(state["labels"], "label")
    domains = _vocab(state["domains"], "domain")
    total_rows, n_chunks = state["rows"], state["n_chunks"]
    mine = [c for c in range(n_chunks) if c % dist.world == dist.rank]

    # --- pass one: encode the chunks of this rank that are not in the cache yet
    import torch

    from fastmft.ops.prototypes import MultiPrototypes, PrototypeAccumulator, Prototypes

    todo = {c for c in mine if not _meta_path(cache, c).exists()}
    resumed = len(mine) - len(todo)
    K, M = len(domains.values), len(labels.values)
    acc = None
    dim = None
    if todo:
        model, tokenizer = _load_model(cfg, device, model, tokenizer)
        dim = model.config.hidden_size
        _encode_chunks(
            cfg, sources, columns, labels, domains, todo, n_chunks, dist, model, tokenizer, device, cache, total_rows
        )
    for c in mine:
        meta = _load_meta(cache, c)
        if acc is None:
            acc = PrototypeAccumulator(M, K, int(meta["sums"].shape[1]))
        acc.merge(_sums_acc(meta, M, K))
    if acc is None:  # a rank without chunks: learn the dim from any chunk
        any_meta = _load_meta(cache, 0) if n_chunks else None
        acc = PrototypeAccumulator(M, K, int(any_meta["sums"].shape[1]) if any_meta else (dim or 1))
    dist.barrier()
    if dist.world > 1:
        acc.all_reduce()

    # --- prototypes (saved so that a resumed pass two uses exactly the same ones)
    proto_path = cache / "prototypes.pt"
    if dist.rank == 0 and not proto_path.exists():
        if cfg.prototypes == 1:
            p = acc.result()
            obj = {"centers": p.centers, "counts": p.counts}
        else:
            obj = _multi_prototypes(cfg, cache, n_chunks, M, K, acc.dim)
        _atomic_write(proto_path, lambda f: torch.save(obj, f))
    dist.barrier()
    obj = torch.load(proto_path, weights_only=True)
    protos = (
        Prototypes(obj["centers"], obj["counts"])
        if cfg.prototypes == 1
        else MultiPrototypes(obj["centers"], obj["counts"], float(obj["temperature"]))
    )
    score_device = device
    if cfg.prototypes == 1:
        protos_dev = Prototypes(protos.centers.to(score_device), protos.counts.to(score_device))
    else:
        protos_dev = MultiPrototypes(
            protos.centers.to(score_device), protos.counts.to(score_device), protos.temperature
        )

    # --- pass two (a): score this rank's chunks from the cache only
    from fastmft.ops.functional import typicality

    for c in mine:
        path = _scores_path(cache, c)
        if path.exists():
            continue
        meta = _load_meta(cache, c)
        n = len(meta["rows"])
        if n:
            emb = torch.from_numpy(np.load(_emb_path(cache, c), mmap_mode="r")[:n].astype(np.float32))
            t = (
                typicality(
                    emb.to(score_device),
                    torch.from_numpy(meta["labels"].astype(np.int64)).to(score_device),
                    torch.from_numpy(meta["domains"].astype(np.int64)).to(score_device),
                    protos_dev,
                    alpha=cfg.alpha,
                )
                .float()
                .cpu()
                .numpy()
            )
        else:
            t = np.zeros(0, np.float32)
        _check_finite(t, meta["ids"], "typicality")
        _atomic_write(path, lambda f: np.save(f, t))
        _crash_point("score")
    dist.barrier()

    # --- pass two (b): rank 0 merges in input order
    summary = None
    if dist.rank == 0:
        summary = _merge(cfg, cache, n_chunks, labels, domains, total_rows)
        summary.seconds = time.perf_counter() - t0
        summary.rows_per_s = summary.rows / summary.seconds if summary.seconds > 0 else 0.0
        summary.resumed_chunks = resumed
        state["status"], state["summary"] = "complete", asdict(summary)
        _atomic_json(cache / "manifest.json", state)  # first: a kill during the clean-up that follows is harmless
    summary = dist.broadcast_obj(summary)
    return summary


def _check_finite(values: np.ndarray, ids, what: str) -> None:
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(1) if len(values) else np.zeros(0, bool)
    if bad.any():
        shown = [str(ids[i]) for i in np.nonzero(bad)[0][:10]]
        raise ScoreError(
            f"{what} is not finite for {int(bad.sum())} row(s), ids {', '.join(shown)}"
            + (" ..." if bad.sum() > 10 else "")
            + "; nothing was written"
        )


def _sums_acc(meta: dict, M: int, K: int):
    import torch

    from fastmft.ops.prototypes import PrototypeAccumulator

    a = PrototypeAccumulator(M, K, int(meta["sums"].shape[1]))
    a.sums = torch.from_numpy(meta["sums"].astype(np.float64))
    a.counts = torch.from_numpy(meta["counts"].astype(np.int64))
    return a


_SAMPLE_ROWS = 1000  # rows of a JSON input read to check that the named columns exist


def _scan(sources: list[Source], cfg: ScoreConfig) -> dict:
    """The cheap first pass: the columns checked, the id column chosen (``id`` when every input has
    one and --id-column is not given), row count (and chunk count), and the vocabularies when not
    given (one value per canonical key, :func:`_key`)."""
    names = [_column_names(src) for src in sources]
    id_column = cfg.id_column
    if id_column is None and all("id" in n for n in names):
        id_column = "id"
    columns = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.domain_column, id_column) if c]
    for src, present in zip(sources, names):
        missing = [c for c in columns if c not in present]
        if missing:
            what = "no column" if src.kind != "json" else f"no field in its first {_SAMPLE_ROWS} rows named"
            raise ScoreError(
                f"{src.path} has {what} {', '.join(map(repr, missing))}; its columns are {sorted(present)}"
            )
    need_labels, need_domains = cfg.label_values is None, cfg.domain_values is None
    rows = 0
    seen_l: dict = {}
    seen_d: dict = {}
    if not (need_labels or need_domains):
        rows = sum(_count_rows(s) for s in sources)
    else:
        want = [c for c in (cfg.label_column, cfg.domain_column)]
        for src in sources:
            for _, payload in _raw_records(src, want):
                rows += 1
                try:
                    row = _decode(payload)
                except _Reject:
                    continue
                for need, seen, column in (
                    (need_labels, seen_l, cfg.label_column),
                    (need_domains, seen_d, cfg.domain_column),
                ):
                    v = row.get(column)
                    if (
                        need and v is not None and v != "" and not isinstance(v, (list, dict))
                    ):  # those rows are rejected later
                        seen.setdefault(_key(v), v)

    def vocab(given, seen, name):
        if given is not None:
            return list(given)
        try:
            return sorted(seen.values())
        except TypeError:
            raise ScoreError(
                f"{name} values mix types and cannot be ordered: {sorted(map(repr, seen.values()))}; "
                f"pass --{name}-values"
            ) from None

    out = {
        "rows": rows,
        "n_chunks": math.ceil(rows / cfg.chunk_rows),
        "id_column": id_column,
        "labels": vocab(cfg.label_values, seen_l, "label"),
        "domains": vocab(cfg.domain_values, seen_d, "domain"),
    }
    _vocab(out["labels"], "label"), _vocab(out["domains"], "domain")  # validate
    return out


def _column_names(src: Source) -> set:
    """The input's columns; for JSON, the fields found in its first rows."""
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        return set(pq.ParquetFile(src.path).schema_arrow.names)
    if src.kind == "dataset":
        import datasets

        return set(datasets.load_from_disk(src.path).column_names)
    if src.kind == "csv":
        with open(src.path, encoding="utf-8-sig", errors="replace", newline="") as f:
            return set(next(csv.reader(f), []))
    names: set = set()
    for n, (_, payload) in enumerate(_raw_records(src, [])):
        if n >= _SAMPLE_ROWS:
            break
        try:
            names.update(_decode(payload))
        except _Reject:
            continue
    return names


def _validate(row: dict, cfg: ScoreConfig, labels: Vocab, domains: Vocab, index: int):
    text = row.get(cfg.text_column)
    if not isinstance(text, str) or not text.strip():
        raise _Reject(f"missing text ({cfg.text_column!r})")
    pair = None
    if cfg.text_pair_column:
        pair = row.get(cfg.text_pair_column)
        if not isinstance(pair, str) or not pair.strip():
            raise _Reject(f"missing text pair ({cfg.text_pair_column!r})")
    out = []
    for column, vocab in ((cfg.label_column, labels), (cfg.domain_column, domains)):
        v = row.get(column)
        if v is None or v == "":
            raise _Reject(f"missing {vocab.name} ({column!r})")
        if isinstance(v, (list, dict)):
            raise _Reject(
                f"{vocab.name} ({column!r}) is a JSON {'list' if isinstance(v, list) else 'object'}, not a value"
            )
        i = vocab.get(v)
        if i is None:
            raise _Reject(f"unknown {vocab.name} {v!r}")
        out.append(i)
    if cfg.id_column:
        rid = row.get(cfg.id_column)
        if rid is None or rid == "":
            raise _Reject(f"missing id ({cfg.id_column!r})")
        rid = _key(rid)
    else:
        rid = str(index)
    return text, pair, out[0], out[1], rid


def _reader(
    cfg, sources, columns, labels, domains, todo, n_chunks, dist, tokenizer, out: queue.Queue, stop: threading.Event
):
    """Background thread: parse, validate and tokenise the chunks in ``todo``, put them on ``out``
    (length-sorted batches ready for the encoder), then None. Exceptions go on the queue."""
    try:
        import torch

        pad = tokenizer.pad_token_id or 0
        want_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"])

        def finish(ch: _Chunk) -> None:
            if ch.texts:
                # in slices: the tokenizer's encodings of a whole chunk (tokens, offsets, ...) would
                # hold ~40 KB per row at once; only the ids are kept
                ids, tts = [], ([] if want_tt else None)
                for s in range(0, len(ch.texts), _TOKENIZE_ROWS):
                    enc = tokenizer(
                        ch.texts[s : s + _TOKENIZE_ROWS],
                        None if ch.pairs is None else ch.pairs[s : s + _TOKENIZE_ROWS],
                        truncation=True,
                        max_length=cfg.max_length,
                        return_attention_mask=False,
                        return_token_type_ids=want_tt,
                    )
                    ids.extend(enc["input_ids"])
                    if tts is not None and "token_type_ids" in enc:
                        tts.extend(enc["token_type_ids"])
                    else:
                        tts = None
                    del enc
                lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
                # longest first: the first batch sizes the allocator's buffers, later ones reuse them
                order = np.argsort(-lengths, kind="stable")
                for s in range(0, len(order), cfg.batch_size):
                    pos = order[s : s + cfg.batch_size]
                    T = int(lengths[pos].max())
                    inp = np.full((len(pos), T), pad, dtype=np.int64)
                    mask = np.zeros((len(pos), T), dtype=np.int64)
                    tt = np.zeros((len(pos), T), dtype=np.int64) if tts is not None else None
                    for r, p in enumerate(pos):
                        n = lengths[p]
                        inp[r, :n] = ids[p]
                        mask[r, :n] = 1
                        if tt is not None:
                            tt[r, :n] = tts[p]
                    batch = {"input_ids": torch.from_numpy(inp), "attention_mask": torch.from_numpy(mask)}
                    if tt is not None:
                        batch["token_type_ids"] = torch.from_numpy(tt)
                    ch.batches.append((torch.from_numpy(pos.copy()), batch))
            ch.texts, ch.pairs = [], None
            while not stop.is_set():
                try:
                    out.put(ch, timeout=0.5)
                    return
                except queue.Full:
                    continue

        index = 0
        ch: _Chunk | None = None
        C = cfg.chunk_rows
        for src in sources:
            for line, payload in _raw_records(src, columns):
                if stop.is_set():
                    return
                c = index // C
                if ch is not None and ch.index != c:
                    finish(ch)
                    ch = None
                if c in todo:
                    if ch is None:
                        ch = _Chunk(c, [], [], [], [], [], [] if cfg.text_pair_column else None, [])
                    ch.n_input += 1
                    try:
                        text, pair, y, k, rid = _validate(_decode(payload), cfg, labels, domains, index)
                    except _Reject as rej:
                        if cfg.strict:
                            raise ScoreError(f"{src.path}, line {line}: {rej} (--strict)") from None
                        ch.rejects.append({"file": src.path, "line": line, "row": index, "reason": str(rej)})
                    else:
                        ch.rows.append(index)
                        ch.ids.append(rid)
                        ch.labels.append(y)
                        ch.domains.append(k)
                        ch.texts.append(text)
                        if ch.pairs is not None:
                            ch.pairs.append(pair)
                index += 1
        if ch is not None:
            finish(ch)
        if math.ceil(index / C) != n_chunks:
            raise ScoreError(f"the inputs changed while scoring: {index} rows now, {n_chunks} chunks before")
        out.put(None)
    except BaseException as err:  # noqa: BLE001 - handed to the main thread
        out.put(err)


def _encode_chunks(
    cfg, sources, columns, labels, domains, todo, n_chunks, dist, model, tokenizer, device, cache, total_rows
):
    import torch

    from fastmft.ops.functional import masked_mean_pool

    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    th = threading.Thread(
        target=_reader,
        args=(cfg, sources, columns, labels, domains, todo, n_chunks, dist, tokenizer, q, stop),
        daemon=True,
        name="fastmft-score-reader",
    )
    th.start()
    K, M = len(domains.values), len(labels.values)
    dim = model.config.hidden_size
    bar = None
    if cfg.progress and dist.rank == 0:
        from tqdm.auto import tqdm

        share = sum(min(cfg.chunk_rows, total_rows - c * cfg.chunk_rows) for c in todo)
        bar = tqdm(
            total=share,
            desc="scoring: encoding" + (f" (rank 0 of {dist.world})" if dist.world > 1 else ""),
            unit="row",
            smoothing=0.1,
            dynamic_ncols=True,
        )
    try:
        with torch.inference_mode():
            while True:
                ch = q.get()
                if ch is None:
                    break
                if isinstance(ch, BaseException):
                    raise ch
                n = len(ch.rows)
                # float32: fp16 would turn pooled values above 65504 into inf and every score into NaN
                emb = np.zeros((n, dim), dtype=np.float32)
                for pos, batch in ch.batches:
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    hidden = model(**batch).last_hidden_state
                    pooled = masked_mean_pool(hidden, batch["attention_mask"])
                    emb[pos.numpy()] = pooled.float().cpu().numpy()
                    if bar is not None:
                        bar.update(len(pos))
                    _crash_point("batch")
                ch.batches = []
                _check_finite(emb, ch.ids, "the encoder's embedding")
                e64 = torch.from_numpy(emb).double()
                cells = torch.tensor(ch.domains, dtype=torch.long) * M + torch.tensor(ch.labels, dtype=torch.long)
                sums = torch.zeros(K * M, dim, dtype=torch.float64).index_add_(0, cells, e64)
                counts = torch.bincount(cells, minlength=K * M)
                ids = np.array(ch.ids, dtype=str)
                _atomic_write(_emb_path(cache, ch.index), lambda f: np.save(f, emb))
                _crash_point("chunk-write")
                _atomic_write(
                    _meta_path(cache, ch.index),
                    lambda f: np.savez(
                        f,
                        rows=np.array(ch.rows, dtype=np.int64),
                        ids=ids,
                        labels=np.array(ch.labels, dtype=np.int32),
                        domains=np.array(ch.domains, dtype=np.int32),
                        sums=sums.numpy(),
                        counts=counts.numpy(),
                        n_input=np.int64(ch.n_input),
                        rejects=np.array([json.dumps(r) for r in ch.rejects], dtype=str),
                    ),
                )
                if bar is not None:
                    bar.update(len(ch.rejects))
    finally:
        stop.set()
        if bar is not None:
            bar.close()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.1)


def _multi_prototypes(cfg, cache, n_chunks, M, K, dim) -> dict:
    """Spherical k-means per cell on the cached embeddings, one cell at a time."""
    import torch

    from fastmft.data import stream_seed
    from fastmft.ops.prototypes import multi_prototypes

    J = cfg.prototypes
    centers = torch.zeros(K, M, J, dim, dtype=torch.float32)
    counts = torch.zeros(K, M, J, dtype=torch.int64)
    metas = [(c, _load_meta(cache, c)) for c in range(n_chunks)]
    cell_of = [(c, m["domains"].astype(np.int64) * M + m["labels"].astype(np.int64)) for c, m in metas]
    for cell in range(K * M):
        parts = []
        for c, cells in cell_of:
            sel = np.nonzero(cells == cell)[0]
            if len(sel):
                parts.append(np.load(_emb_path(cache, c), mmap_mode="r")[sel].astype(np.float32))
        if not parts:
            continue
        x = torch.from_numpy(np.concatenate(parts))
        zero = torch.zeros(len(x), dtype=torch.long)
        g = torch.Generator().manual_seed(stream_seed(cfg.seed, cell))
        mp = multi_prototypes(x, zero, zero, 1, 1, J, temperature=cfg.temperature, generator=g)
        k, m = divmod(cell, M)
        centers[k, m], counts[k, m] = mp.centers[0, 0], mp.counts[0, 0]
    return {"centers": centers, "counts": counts, "temperature": cfg.temperature}


def _merge(
    cfg: ScoreConfig, cache: Path, n_chunks: int, labels: Vocab, domains: Vocab, total_rows: int
) -> ScoreSummary:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rej_path = cfg.rejects_path()
    rej_path.parent.mkdir(parents=True, exist_ok=True)
    label_arr = pa.array(labels.values)
    domain_arr = pa.array(domains.values)
    id_type = pa.string()
    schema = pa.schema(
        [("id", id_type), ("domain", domain_arr.type), ("label", label_arr.type), ("typicality", pa.float32())]
    )
    summary = ScoreSummary(labels=labels.values, domains=domains.values, output=str(out), rejects=str(rej_path))
    k = cfg.top_k if cfg.report else 0
    per_domain = np.zeros((len(domains.values), 2))  # rows, sum of typicality
    top = [[] for _ in domains.values]  # min-heaps of (score, row, id, label)
    bottom = [[] for _ in domains.values]  # min-heaps of (-score, -row, id, label)
    # Unique temporary names beside the outputs, recorded in the cache before they are created:
    # a rerun after a kill removes exactly those and nothing else.
    record = cache / "merge-temps.json"
    if record.is_file():
        for stale in json.loads(record.read_text()):
            Path(stale).unlink(missing_ok=True)
    tmp, rtmp = (p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp") for p in (out, rej_path))
    _atomic_json(record, [str(tmp), str(rtmp)])
    with pq.ParquetWriter(tmp, schema) as writer, open(rtmp, "w", encoding="utf-8") as rej:
        for c in range(n_chunks):
            meta = _load_meta(cache, c)
            scores = np.load(_scores_path(cache, c))
            summary.rows += int(meta["n_input"])
            for r in meta["rejects"]:
                rec = json.loads(str(r))
                summary.reasons[rec["reason"]] = summary.reasons.get(rec["reason"], 0) + 1
                summary.rejected += 1
                rej.write(json.dumps(rec) + "\n")
            n = len(meta["rows"])
            summary.scored += n
            if not n:
                continue
            ids = meta["ids"].tolist()
            table = pa.table(
                {
                    "id": pa.array(ids, type=id_type),
                    "domain": domain_arr.take(pa.array(meta["domains"])),
                    "label": label_arr.take(pa.array(meta["labels"])),
                    "typicality": pa.array(scores, type=pa.float32()),
                },
                schema=schema,
            )
            writer.write_table(table)
            _crash_point("merge")
            np.add.at(per_domain, (meta["domains"], 0), 1.0)
            np.add.at(per_domain, (meta["domains"], 1), scores.astype(np.float64))
            if k:
                for i in range(n):
                    d, s, row = int(meta["domains"][i]), float(scores[i]), int(meta["rows"][i])
                    item = (s, -row, ids[i], labels.values[int(meta["labels"][i])])
                    (heapq.heappush if len(top[d]) < k else heapq.heappushpop)(top[d], item)
                    item = (-s, -row, ids[i], labels.values[int(meta["labels"][i])])
                    (heapq.heappush if len(bottom[d]) < k else heapq.heappushpop)(bottom[d], item)
        rej.flush()
        os.fsync(rej.fileno())
    if summary.rows != total_rows:
        raise ScoreError(f"internal error: {summary.rows} rows merged, {total_rows} expected")
    if summary.rejected:
        os.replace(rtmp, rej_path)
    else:  # no rejects file for a run without rejects (an old one of this output would mislead)
        rtmp.unlink()
        if rej_path.is_file() and not rej_path.stat().st_size:
            rej_path.unlink()
    if not summary.scored:
        tmp.unlink()
        record.unlink()
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.reasons.items())) or "no input rows"
        raise ScoreError(
            f"no row was accepted ({summary.rows} rows: {reasons}); the rejected rows are in {rej_path}"
            if summary.rejected
            else "the input has no rows"
        )
    if cfg.report:
        report = {"alpha": cfg.alpha, "prototypes": cfg.prototypes, "domains": {}}
        for d, name in enumerate(domains.values):
            report["domains"][str(name)] = {
                "rows": int(per_domain[d, 0]),
                "mean_typicality": float(per_domain[d, 1] / per_domain[d, 0]) if per_domain[d, 0] else None,
                "most_typical": [
                    {"id": i, "label": lab, "typicality": s} for s, _, i, lab in sorted(top[d], reverse=True)
                ],
                "least_typical": [
                    {"id": i, "label": lab, "typicality": -s} for s, _, i, lab in sorted(bottom[d], reverse=True)
                ],
            }
        _atomic_json(Path(cfg.report), report)
        summary.report = cfg.report
    os.replace(tmp, out)  # the output appears last: its presence means the run is complete
    record.unlink()
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
