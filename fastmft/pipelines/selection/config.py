"""The settings of a task-selection run (``fastmft select``), each field declared once with its
help text (fastmft.runtime.settings); :class:`~.selector.TaskSelector`'s defaults are these.
Torch-free: ``fastmft select --help`` imports it."""

from __future__ import annotations

from dataclasses import dataclass

from fastmft.data import MAX_LENGTH
from fastmft.runtime.settings import (
    backbone_setting,
    check_settings,
    column_settings,
    device_setting,
    progress_setting,
    setting,
    threads_setting,
    trust_remote_code_setting,
)


@dataclass
class SelectConfig:
    data: str | None = setting(
        None, "multi-domain data (JSONL/CSV/Parquet/saved dataset; default: the embedded synthetic corpus)"
    )
    text_column: str = column_settings()["text_column"]
    text_pair_column: str | None = column_settings()["text_pair_column"]
    label_column: str = column_settings()["label_column"]
    domain_column: str = column_settings()["domain_column"]
    split_column: str = setting(
        "split", "train rows feed the source tasks, the target domain's dev rows the target (when the column exists)"
    )
    unlabeled_splits: str = setting(
        "train",
        "comma-separated splits whose texts feed mlm and shuffle ('all': every row, dev and test included)",
    )
    target_domain: str | None = setting(None, "downstream-aware target (default: the last domain)")
    agnostic: bool = setting(False, "downstream-agnostic: the targets are the sources")
    sources: tuple[str, ...] = setting(("mlm", "domains"), "comma-separated, from mlm, shuffle, domains")
    episodes: int = setting(10, "episodes to run now (after those of a resumed checkpoint)", low=0)
    m: int = setting(2, "batches per task for scoring (M)", low=1)
    n: int = setting(4, "training batches of the chosen task per episode (N)", low=1)
    epsilon: float = setting(0.1, "probability of a uniformly random task instead of the best", low=0.0, high=1.0)
    inner_lr: float = setting(1e-3, "alpha of the inner step", low=0.0, low_open=True)
    inner: str = setting(
        "sgd",
        "inner step: sgd (alpha = `inner_lr`) or adam (the real AdamW step's look-ahead: its lr, its preconditioning)",
        choices=("sgd", "adam"),
    )
    lr: float = setting(2e-5, "AdamW learning rate of the real training", low=0.0, low_open=True)
    # select trains on its batches, so they are small
    max_length: int = setting(MAX_LENGTH, "tokens per row after truncation", low=2)
    batch_size: int = setting(16, "rows per batch (a task with fewer rows has batches of all of them)", low=1)
    seed: int = setting(0, "seed of task sampling, batches, dropout and the heads' initialisation")
    backbone: str | None = backbone_setting()
    trust_remote_code: bool = trust_remote_code_setting()
    device: str | None = device_setting()
    threads: int | None = threads_setting()
    progress: bool = progress_setting()
    output_dir: str = setting("runs/select", "episode log and checkpoint; an existing checkpoint is resumed")

    def __post_init__(self):
        check_settings(self)
        self.sources = tuple(self.sources)
