"""The chunk cache of the streaming pipeline and its crash safety.

The cache folder (default ``<output>.score-cache/``) is marked as fastmft's and locked while a run
uses it. A non-empty folder without the marker is refused (it is someone else's), and only
fastmft's own file names are ever removed. Per chunk c it holds ``chunk-c.emb.npy`` (float32
embeddings of the accepted rows, memory-mapped when read), ``chunk-c.meta.npz`` (rows, ids,
labels, domains, input row count, rejects) and, after pass two, ``chunk-c.scores.npy``; besides
them ``manifest.json`` (the command's key and the first pass's counts), ``prototypes.pt`` and
``merge-temps.json``. Every file is written to a unique temporary name and renamed into place; a
chunk counts as encoded once its metadata file exists (renamed last). The metadata records the
sha256 of the embeddings file, so a resumed run verifies every chunk it did not write itself and
encodes a damaged one again (a cache may live on shared storage others write to); prototypes and
scores are cheap and deterministic, so a resumed run recomputes them instead of trusting them.
Tests kill a run at the fault points of :mod:`fastmft.runtime.faults`."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from fastmft.data import Source
from fastmft.runtime.faults import fault_point
from fastmft.runtime.files import atomic_write, file_sha256

from .core import ScoreError

CACHE_VERSION = 4  # 2: float32 embeddings, text ids, content-hashed inputs; 3: no per-chunk sums;
# 4: the embeddings' sha256 in each chunk's metadata


def fingerprint(sources: Sequence[Source]) -> list:
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


# Every name fastmft writes in a cache folder (and the temporary names atomic_write derives from
# them): the only files it ever deletes there.
_MARKER = ".fastmft-score-cache"
_LOCK = ".lock"
_ADOPTED = "adopted\n"  # the marker's content when the user gave the (empty) folder
_OWN_NAME = re.compile(
    r"^\.?(chunk-\d{7}\.(emb\.npy|meta\.npz|scores\.npy)|prototypes\.pt|manifest\.json|merge-temps\.json)"
    r"(\.[^/]*\.tmp)?$"
)


def discard_derived(cache: Path) -> None:
    """Remove the prototypes and scores (and their temporaries): a resumed run recomputes them from
    the verified chunks rather than trusting files it did not write."""
    for f in cache.iterdir():
        if _OWN_NAME.match(f.name) and f.is_file() and ("prototypes.pt" in f.name or ".scores.npy" in f.name):
            f.unlink(missing_ok=True)


def discard_chunk(cache: Path, c: int) -> None:
    """Remove chunk ``c``'s files, its metadata first: the chunk then counts as not encoded."""
    for path in (meta_path(cache, c), emb_path(cache, c), scores_path(cache, c)):
        path.unlink(missing_ok=True)


def chunk_damage(cache: Path, c: int) -> str | None:
    """Why encoded chunk ``c`` cannot be trusted (unreadable metadata, an embeddings file whose
    sha256 differs from the one recorded, or whose rows are not the metadata's), or None."""
    try:
        meta = load_meta(cache, c)
        want = str(meta["emb_sha256"])
        if file_sha256(emb_path(cache, c)) != want:
            return "its embeddings file does not match the sha256 recorded when it was written"
        rows = np.load(emb_path(cache, c), mmap_mode="r").shape[0]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # unreadable or incomplete
        return f"it cannot be read ({type(err).__name__}: {err})"
    if rows != len(meta["ids"]):
        return f"its embeddings hold {rows} rows, its metadata {len(meta['ids'])}"
    return None


def discard_cache(cache: Path) -> None:
    """Remove this cache's files (never the folder's other content, nor the marker and lock)."""
    for f in cache.iterdir():
        if _OWN_NAME.match(f.name) and f.is_file():
            f.unlink(missing_ok=True)


def open_cache(cache: Path):
    """Create or adopt the cache folder and lock it; returns the open lock file (kept open for the
    run). A non-empty folder without fastmft's marker is refused: it is someone else's."""
    import fcntl

    if cache.exists() and not cache.is_dir():
        raise ScoreError(f"`cache_dir` {cache} is a file, not a folder")
    if cache.is_dir() and not (cache / _MARKER).is_file() and any(cache.iterdir()):
        raise ScoreError(
            f"`cache_dir` {cache} is a non-empty folder that is not a fastmft score cache; "
            "fastmft will not write into it or delete from it: pass an empty or new folder"
        )
    created = not cache.exists()
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / _MARKER).is_file():  # whether the folder is fastmft's to remove after success
        (cache / _MARKER).write_text("" if created else _ADOPTED)
    lock = open(cache / _LOCK, "a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ScoreError(
            f"another fastmft score run is using the cache {cache}; wait for it to finish "
            "or pass another `output`/`cache_dir`"
        ) from None
    return lock


def close_cache(cache: Path, lock, keep: bool) -> None:
    """After success without --keep-cache: remove the cache's files, then the folder if it is empty."""
    ours = not keep and (cache / _MARKER).read_text() != _ADOPTED
    if not keep:
        discard_cache(cache)
        for name in (_MARKER, _LOCK):
            (cache / name).unlink(missing_ok=True)
    lock.close()
    if ours:  # a folder the user gave (empty) stays
        try:
            cache.rmdir()
        except OSError:  # not empty: something else lives there now
            pass


def encoded_rows(cache: Path) -> bool:
    """Whether any cached chunk holds an accepted row (a run that encoded nothing lost nothing); an
    unreadable embeddings file counts as holding rows, so that it is never discarded unasked."""

    def rows(f: Path) -> int:
        try:
            return np.load(f, mmap_mode="r").shape[0]
        except (OSError, ValueError):
            return 1

    return any(
        _OWN_NAME.match(f.name) and not f.name.startswith(".") and rows(f) > 0 for f in cache.glob("chunk-*.emb.npy")
    )


def emb_path(cache: Path, c: int) -> Path:
    return cache / f"chunk-{c:07d}.emb.npy"


def meta_path(cache: Path, c: int) -> Path:
    return cache / f"chunk-{c:07d}.meta.npz"


def scores_path(cache: Path, c: int) -> Path:
    return cache / f"chunk-{c:07d}.scores.npy"


def load_meta(cache: Path, c: int) -> dict:
    with np.load(meta_path(cache, c), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_embeddings(cache: Path, c: int, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """Float32 embeddings of chunk ``c`` (the ``rows`` of them), read through a memory map."""
    return np.load(emb_path(cache, c), mmap_mode="r")[rows].astype(np.float32)


def write_chunk(cache: Path, c: int, emb: np.ndarray, meta: dict) -> None:
    """The chunk's embeddings, then its metadata: the chunk is done once the metadata exists."""
    atomic_write(emb_path(cache, c), lambda f: np.save(f, emb))
    fault_point("chunk-write")
    digest = np.array(file_sha256(emb_path(cache, c)))
    atomic_write(meta_path(cache, c), lambda f: np.savez(f, **meta, emb_sha256=digest))
