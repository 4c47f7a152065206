"""Crash-safe files and checkpoints: a kill -9 at any moment leaves either the old or the new
version, never a mix, and only names fastmft created are ever removed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` into a uniquely named temporary file beside ``path``, fsync it
    and rename it into place; the temporary file is removed when writing fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_path(path: Path, write: Callable[[str], None]) -> None:
    """:func:`atomic_write` for writers that take a file name (safetensors' save_model)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str)), mode="w")


def check_writable(folder: Path, what: str) -> None:
    """A real write in ``folder`` (a uniquely named empty file, removed at once): permission bits do
    not tell an immutable or read-only-mounted folder, nor anything to root. ValueError if it fails."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastmft-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {folder} is not writable ({err.strerror})") from None


RUN_MARKER = ".fastmft-run"  # in a run folder (train, select): fastmft created or adopted it


def check_run_folder(folder: Path, option: str, legacy: str) -> None:
    """Before any work: ``folder`` is (or can be made) a writable folder that is fastmft's: new,
    empty, marked with RUN_MARKER, or holding ``legacy`` (what an older fastmft's run left there).
    Anything else holds a user's files and is refused, as score's cache is."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder")
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {folder}: {parent} is a file, not a folder")
    check_writable(parent, f"{option} {folder}: the folder")
    if (
        folder.is_dir()
        and not (folder / RUN_MARKER).is_file()
        and not (folder / legacy).exists()
        and any(folder.iterdir())
    ):
        raise ValueError(
            f"{option} {folder} is a non-empty folder that fastmft did not create; fastmft will not write "
            "into it: pass a new or empty folder"
        )


def claim_run_folder(folder: Path, option: str, legacy: str):
    """:func:`check_run_folder`, then create or mark the folder and lock it for this run; returns
    the open lock file (the lock lasts until it is closed or the process ends)."""
    import fcntl

    folder = Path(folder)
    check_run_folder(folder, option, legacy)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_MARKER).touch()
        lock = open(folder / ".lock", "a")
    except OSError as err:  # read-only or immutable although the permission bits allow it
        raise ValueError(f"{option} {folder}: cannot write there ({err.strerror})") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(
            f"another fastmft run is using {option} {folder}; wait for it to finish or pass another folder"
        ) from None
    return lock


def trim_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` complete lines of an append-only log (lines logged after the
    checkpoint a run resumes from, or half a line cut by a kill, would otherwise repeat)."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    lines = [l for l in lines[:keep] if l.endswith(b"\n")]
    if len(lines) != keep:
        raise ValueError(f"{path} has {len(lines)} complete lines, the checkpoint counted {keep}")
    atomic_write(path, lambda f: f.write(b"".join(lines)))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read through one small buffer (checkpoints reach gigabytes)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class CheckpointDir:
    """Checkpoints as folders ``<name>-<n>`` inside ``root``, published as one unit: the files are
    written in a temporary folder, their sizes and sha256 recorded in ``checksums.json`` (written
    last), everything fsynced, the folder renamed, then the pointer file ``<name>.json`` replaced
    (os.replace) to name it, and only then the folders older than the previous one go: the previous
    checkpoint stays, so that one found damaged later (see below) falls back to it.

    Before ``read`` sees a checkpoint every file of it is checked against ``checksums.json``: a
    changed byte that leaves a file's structure intact (inside tensor data) would otherwise be
    trusted. A checkpoint without ``checksums.json`` was written by an earlier fastmft: it is used
    after a warning, with only the structural checks of ``read`` (refusing it would throw away the
    progress of a run started before the upgrade, and the checkpoints it writes next carry
    checksums)."""

    CHECKSUMS = "checksums.json"

    def __init__(self, root: Path, name: str = "checkpoint"):
        self.root, self.name = Path(root), name
        self.pointer = self.root / f"{name}.json"
        self._folder_re = re.compile(rf"^{re.escape(name)}-(\d+)$")
        self._tmp_re = re.compile(rf"^\.{re.escape(name)}-\d+\.[^/]*\.tmp$")

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := self._folder_re.match(p.name)) and p.is_dir()
        ]
        return sorted(found, reverse=True)

    def current(self) -> Path | None:
        """The folder the pointer names; None when there is no pointer or it does not name one of
        this root's checkpoint folders (a damaged or crafted pointer never leads outside it)."""
        if not self.pointer.is_file():
            return None
        try:
            name = json.loads(self.pointer.read_text())["folder"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(name, str) or not self._folder_re.match(name):
            return None
        return self.root / name

    def candidates(self) -> list[Path]:
        """The published checkpoint first, then older complete ones (newest first)."""
        cur = self.current()
        rest = [p for _, p in self._numbered() if p != cur and (cur is None or self._n(p) < self._n(cur))]
        return ([cur] if cur is not None and cur.is_dir() else []) + rest

    def _n(self, p: Path) -> int:
        return int(self._folder_re.match(p.name).group(1))

    def load(self, read: Callable[[Path], Any]) -> Any:
        """``read(folder)`` of the newest checkpoint that reads; a broken one is reported and the
        previous one used. None when there is no checkpoint."""
        candidates = self.candidates()
        if self.pointer.is_file() and self.current() is None:
            warnings.warn(
                f"{self.pointer} does not name a checkpoint folder of {self.root}; ignoring it",
                RuntimeWarning,
                stacklevel=2,
            )
        for i, folder in enumerate(candidates):
            try:
                self.verify(folder)
                return read(folder)
            except Exception as err:  # noqa: BLE001 - a damaged checkpoint: try the previous one
                then = (
                    f"falling back to the previous complete checkpoint {candidates[i + 1].name}"
                    if i + 1 < len(candidates)
                    else "there is no earlier checkpoint: starting from the beginning"
                )
                warnings.warn(
                    f"checkpoint {folder} is unreadable ({type(err).__name__}: {err}); {then}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return None

    def verify(self, folder: Path) -> None:
        """Every file of ``folder`` has the size and sha256 its ``checksums.json`` records, and no
        file is missing or unlisted; ValueError naming the first that is not. Without
        ``checksums.json`` (an earlier fastmft's checkpoint): a warning (class docstring)."""
        manifest = folder / self.CHECKSUMS
        if not manifest.is_file():
            warnings.warn(
                f"checkpoint {folder} has no {self.CHECKSUMS} (written by an earlier fastmft): "
                "its files are checked for structure only",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        files = json.loads(manifest.read_text())["files"]
        present = {f.name for f in folder.iterdir()} - {self.CHECKSUMS}
        if present != set(files):
            odd = sorted(present ^ set(files))[0]
            raise ValueError(
                f"{odd} is {'not listed in' if odd in present else 'missing but listed in'} {self.CHECKSUMS}"
            )
        for name, want in sorted(files.items()):
            path = folder / name
            if path.stat().st_size != want["size"] or file_sha256(path) != want["sha256"]:
                raise ValueError(f"{name} does not match the size and sha256 recorded in {self.CHECKSUMS}")

    def save(self, write: Callable[[Path], None]) -> Path:
        """``write(folder)`` fills a fresh folder; returns the published folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        numbered = self._numbered()
        n = numbered[0][0] + 1 if numbered else 1
        final = self.root / f"{self.name}-{n:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            write(tmp)
            sums = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
            (tmp / self.CHECKSUMS).write_text(json.dumps({"files": sums}, indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        atomic_json(self.pointer, {"folder": final.name})
        fsync_dir(self.root)
        for _, old in numbered[1:]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def clean_stale(self) -> None:
        """Remove what a killed save left: temporary folders and folders newer than the pointer."""
        if not self.root.is_dir():
            return
        cur = self.current()
        for p in self.root.iterdir():
            if self._tmp_re.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        for n, p in self._numbered():
            if cur is not None and n > self._n(cur):
                shutil.rmtree(p, ignore_errors=True)

    def clear(self) -> None:
        """Remove every checkpoint (the run no longer needs one)."""
        self.pointer.unlink(missing_ok=True)
        for _, p in self._numbered():
            shutil.rmtree(p, ignore_errors=True)
        self.clean_stale()
