"""The run folder of one method: typicality, meta-learner, metrics log, and the checkpoint a run
resumes from to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from fastmft.runtime.dist import Dist
from fastmft.runtime.files import CheckpointDir, check_run_folder, claim_run_folder, trim_lines

# The layout of state.json and its checkpoint folder; a checkpoint of another version is refused.
_STATE_VERSION = 2

# Settings that may change between an interrupted run and its resumption.
_RESUME_FREE = {
    "stop_after_steps",
    "stop_after_seconds",
    "progress",
    "log_every",
    "checkpoint_every",
    "device",
    "save_models",
}


class RunStore:
    """The run folder: typicality, meta-learner, metrics, and the checkpoint: state.json (progress,
    results, metrics line count) with the model and optimizer of an unfinished phase, published as
    one unit (:class:`fastmft.runtime.files.CheckpointDir`). ``folder`` None: nothing is written."""

    def __init__(self, folder: str | os.PathLike | None, dist: Dist):
        self.folder = Path(folder) if folder is not None else None
        self.dist = dist
        self.state: dict = {
            "version": _STATE_VERSION,
            "phase": 0,
            "epoch": 0,
            "batch": 0,
            "global_step": 0,
            "results": {},
            "metrics_lines": 0,
        }
        self.checkpoints = CheckpointDir(self.folder) if self.folder is not None else None
        self.loaded: Path | None = None  # the checkpoint folder resumed from
        self._lock = None
        if self.folder is not None:
            check_run_folder(self.folder, "`output_dir`", legacy=self.checkpoints.pointer.name)
            if dist.main:  # a second run on the folder stops here instead of racing this one
                self._lock = claim_run_folder(self.folder, "`output_dir`", legacy=self.checkpoints.pointer.name)

    def close(self) -> None:
        """Release the run folder's lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def path(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / name

    def load(self, config: dict) -> bool:
        if self.folder is None:
            return False
        if self.path("state.json").is_file():  # the layout before checkpoints were one unit
            raise ValueError(
                f"{self.path('state.json')}: checkpoint format 1 is not {_STATE_VERSION}; use another output folder"
            )

        def read(folder: Path) -> tuple[Path, dict]:
            """Past its checksums (:meth:`CheckpointDir.verify`), every file of the checkpoint must
            read (else the previous checkpoint is used): the state, the weights' header and size,
            the optimizer's archive (the structural checks a checkpoint without checksums gets)."""
            state = json.loads((folder / "state.json").read_text())
            if state.get("epoch") or state.get("batch") or (folder / "model.safetensors").exists():
                from safetensors import safe_open

                with safe_open(str(folder / "model.safetensors"), "pt"):
                    pass
                torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
            return folder, state

        found = self.checkpoints.load(read)
        metrics = self.path("metrics.jsonl")
        if found is None:
            if self.dist.main:  # a run killed before its first checkpoint: start the log afresh
                trim_lines(metrics, 0)
            return False
        folder, state = found
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{folder}: checkpoint format {state.get('version')} is not {_STATE_VERSION}")
        saved = {k: v for k, v in state.get("config", {}).items() if k not in _RESUME_FREE}
        now = {k: v for k, v in config.items() if k not in _RESUME_FREE}
        now = json.loads(json.dumps(now))  # tuples -> lists, as saved
        # a setting added after the checkpoint was written is absent there: it matches at None
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(
                f"{folder} was written with other settings ({', '.join(diff)}): use another output folder or the same settings"
            )
        self.state, self.loaded = state, folder
        if self.dist.main:  # drop lines logged after the checkpoint
            trim_lines(metrics, state["metrics_lines"])
        return True

    def save(self, config: dict, model: nn.Module | None = None, optimizer=None, scheduler=None) -> None:
        """A checkpoint of the progress (and of the phase's model and optimizer when given)."""
        if self.folder is None or not self.dist.main:
            return
        self.state["config"] = config

        def write(folder: Path) -> None:
            if model is not None:
                from safetensors.torch import save_model

                save_model(model, str(folder / "model.safetensors"))
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt"
                )
            elif (self.state["epoch"] or self.state["batch"]) and self.loaded is not None:
                for name in ("model.safetensors", "optimizer.pt"):  # mid-phase: the phase's model stays part of it
                    os.link(self.loaded / name, folder / name)
            (folder / "state.json").write_text(json.dumps(self.state, indent=1))

        self.loaded = self.checkpoints.save(write)

    def load_training(self, model: nn.Module, optimizer, scheduler) -> None:
        """Restore the unfinished phase's model, optimizer and scheduler from the loaded checkpoint."""
        from safetensors.torch import load_model

        load_model(model, str(self.loaded / "model.safetensors"), device=str(next(model.parameters()).device))
        states = torch.load(self.loaded / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])

    def log(self, record: dict) -> None:
        if self.folder is None or not self.dist.main:
            return
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.state["metrics_lines"] += 1
