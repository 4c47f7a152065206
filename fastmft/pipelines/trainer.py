"""The MFT trainer: Meta Fine-Tuning as the paper runs it (docs/design.md section 2, Algorithm 1), with
the paper's baselines and ablations under one interface.

Procedure of the MFT methods (``dc``, ``tw``, ``full``):

1. typicality pass with the PRE-TRAINED encoder (prototypes, then one score per training row,
   stored with the data as the column ``typicality`` and in ``<output_dir>/typicality.safetensors``);
2. MFT epochs over all domains with L = L_TLC + lambda * L_SDC (:class:`fastmft.MFTLoss`: label
   head on [CLS], one domain head per skip layer, domain embedding, domain labels shuffled per
   global batch);
3. the added heads are dropped: the meta-learner is the bare encoder again;
4. per domain, a copy of the meta-learner with a fresh classifier is fine-tuned on that domain alone;
5. per-domain evaluation: accuracy and macro-F1.

Methods: ``s`` BERT(S) (step 4 from the pre-trained encoder), ``mix`` BERT(Mix) (one model on the
pooled domains), ``mtl`` BERT(MTL) (shared encoder, one classifier per domain), ``adv`` BERT(Adv)
(pooled, plus a domain classifier behind gradient reversal), ``dc`` MFT(DC) (t = 1), ``tw``
MFT(TW) (lambda = 0), ``full`` MFT(Full).

Training: AdamW, linear warmup then linear decay per phase, gradient clipping, bf16 autocast on
CUDA, length-bucketed batches, tqdm, metrics as JSON lines, checkpoints (model in safetensors,
optimizer and scheduler through torch.save / torch.load(weights_only=True)) that resume to the
same result as an uninterrupted run, and torch.distributed (torchrun): every rank takes its slice
of the same global batch and the loss is rescaled so that the averaged gradient is exactly the
single-process one.

Python API: :func:`train` (one method), :func:`compare` (several methods on the same data),
:func:`meta_train` (steps 1-3 alone, returns the meta-learned encoder). CLI: ``fastmft train``
(fastmft/cli/train.py), also ``python -m fastmft train`` (e.g. under torchrun).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmft.data import (
    MODEL_INPUTS,
    Collator,
    Columns,
    LengthBucketSampler,
    Vocab,
    check_columns,
    encode_labels,
    load_table,
    stream_seed,
    tokenize,
)
from fastmft.ops.functional import shuffle_domains
from fastmft.ops.nn import MFTLoss, skip_layers
from fastmft.runtime.dist import Dist
from fastmft.runtime.files import CheckpointDir, atomic_path, atomic_write, trim_lines

METHODS = ("s", "mix", "mtl", "adv", "dc", "tw", "full")
METHOD_NAMES = {
    "s": "BERT(S)",
    "mix": "BERT(Mix)",
    "mtl": "BERT(MTL)",
    "adv": "BERT(Adv)",
    "dc": "MFT(DC)",
    "tw": "MFT(TW)",
    "full": "MFT(Full)",
}
MFT_METHODS = ("dc", "tw", "full")
JOINT_METHODS = ("mix", "mtl", "adv")
_STATE_VERSION = 2


def method_key(name: str) -> str:
    """'full', 'MFT(Full)', 'bert-s', 'S' ... -> the short key of :data:`METHODS`."""
    key = name.strip().lower()
    for short, long in METHOD_NAMES.items():
        if key in (
            short,
            long.lower(),
            long.lower().replace("(", "-").rstrip(")"),
            long.lower().split("(")[1].rstrip(")"),
        ):
            return short
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} ({', '.join(METHOD_NAMES.values())})")


def _option(field_name: str) -> str:
    return {"num_prototypes": "prototypes"}.get(field_name, field_name).replace("_", "-")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Defaults follow the paper (alpha 0.5, lambda 0.1, 1 MFT epoch,
    2 fine-tuning epochs) with the learning rate raised for the small default backbone."""

    method: str = "full"
    mft_epochs: int = 1  # MFT epochs over all domains (dc, tw, full)
    epochs: int = 2  # fine-tuning epochs: per domain (s and the MFT methods), pooled (mix, mtl, adv)
    batch_size: int = 32  # GLOBAL batch (split over the ranks under torch.distributed)
    lr: float = 5e-5
    mft_lr: float | None = None  # default: lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    alpha: float = 0.5
    lam: float = 0.1
    layers: tuple[int, ...] | None = None  # skip layers L_s (1-based); default thirds of the depth
    num_prototypes: int = 1
    adv_weight: float = 0.1  # weight of BERT(Adv)'s domain loss (gradient reversal coefficient 1)
    few_shot: float = 1.0  # fraction of each domain's training rows (stratified by label)
    placebo: bool = False  # diagnostic: permute t within each domain (keeps per-domain weights only)
    max_length: int = 128
    pair_join: bool = False  # join text and text_pair into one text with the tokenizer's separator
    dropout: float | None = None  # override the encoder's dropout probabilities (0 for exact DDP parity)
    seed: int = 0
    device: str | None = None  # default: cuda (this rank's) when available, else cpu
    bf16: bool = True  # autocast to bfloat16 on CUDA
    log_every: int = 10
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    stop_after_steps: int | None = None  # checkpoint and return after this many steps in all (resume later)
    stop_after_seconds: float | None = None  # time box: checkpoint and return once this call ran this long
    save_models: bool = False  # keep each final (per-domain) model as safetensors in output_dir/models
    progress: bool = True

    def __post_init__(self):
        self.method = method_key(self.method)
        if self.layers is not None:
            if not self.layers or not all(
                isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in self.layers
            ):
                raise ValueError(f"layers (--layers) must be 1-based integer layer numbers, got {self.layers!r}")
            self.layers = tuple(self.layers)
        ints = {
            "mft_epochs": 0,
            "epochs": 0,
            "batch_size": 1,
            "num_prototypes": 1,
            "max_length": 2,
            "log_every": 0,
            "checkpoint_every": 0,
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} (--{_option(name)}) must be an integer >= {low}, got {value!r}")
        # (low, high, low open): every float must be finite and in its range (NaN fails every comparison)
        ranges = {
            "lr": (0.0, math.inf, True),
            "weight_decay": (0.0, math.inf, False),
            "warmup_ratio": (0.0, 1.0, False),
            "max_grad_norm": (0.0, math.inf, False),
            "alpha": (0.0, 1.0, False),
            "lam": (0.0, math.inf, False),
            "adv_weight": (0.0, math.inf, False),
            "few_shot": (0.0, 1.0, True),
        }
        for name, (low, high, open_low) in ranges.items():
            value = getattr(self, name)
            ok = (
                isinstance(value, (int, float))
                and math.isfinite(value)
                and (value > low if open_low else value >= low)
                and value <= high
            )
            if not ok:
                span = (
                    f"{'(' if open_low else '['}{low:g}, {high:g}]"
                    if high < math.inf
                    else f"{'>' if open_low else '>='} {low:g}"
                )
                raise ValueError(
                    f"{name} (--{_option(name)}) must be a finite number {'in ' if high < math.inf else ''}{span}, got {value!r}"
                )
        if self.mft_lr is not None and not (math.isfinite(self.mft_lr) and self.mft_lr > 0):
            raise ValueError(f"mft_lr (--mft-lr) must be a finite number > 0, got {self.mft_lr!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout (--dropout) must lie in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    method: str
    per_domain: dict[str, dict]  # domain -> {accuracy, macro_f1, n, predictions (in evaluation row order)}
    accuracy: float  # average over domains (the paper's "Avg.")
    macro_f1: float
    wall_time_s: float
    complete: bool = True  # False when stop_after_steps cut the run short (resume to finish)
    config: dict = field(default_factory=dict)
    device: str = ""
    steps: int = 0
    dev_per_domain: dict[str, dict] = field(default_factory=dict)  # the same on TrainData.dev, when given

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    """Tokenised train and evaluation sets with integer ``labels`` and ``domains``."""

    train: Any  # datasets.Dataset
    eval: Any
    label_vocab: Vocab
    domain_vocab: Vocab
    columns: Columns
    dev: Any = None  # optional second evaluation set (a dev split), scored beside ``eval``


def _select_split(ds, split: str | None, split_column: str, what: str):
    if split is None or split_column not in ds.column_names:
        return ds
    out = ds.filter(lambda s: s == split, input_columns=split_column)
    if len(out) == 0:
        raise ValueError(f"{what}: no row has {split_column} == {split!r}")
    return out


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
    max_length: int = 128,
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
        evaluation = _select_split(train, eval_split, split_column, "evaluation data")
    else:
        evaluation = _select_split(load_table(eval_source), eval_split, split_column, "evaluation data")
        check_columns(evaluation, columns)
    train = _select_split(train, train_split, split_column, "training data")
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


def _rows(ds, extra: Sequence[str] = ()) -> list[dict]:
    wanted = [c for c in (*MODEL_INPUTS, "labels", "domains", *extra) if c in ds.column_names]
    return ds.select_columns(wanted).to_list()


# ----------------------------------------------------------------------------------------------
# models


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Identity forward, gradient times -coeff backward (Ganin & Lempitsky)."""
    return _GradReverse.apply(x, coeff)


def _encode(encoder, batch: dict, hidden_states: bool = False):
    return encoder(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, output_hidden_states=hidden_states)


def _hidden(encoder) -> int:
    return encoder.config.hidden_size


class Classifier(nn.Module):
    """Encoder + classifier on the last layer's [CLS] state. ``num_heads`` > 1: one classifier per
    domain (BERT(MTL)). ``adv_domains``: a domain classifier behind gradient reversal (BERT(Adv))."""

    def __init__(self, encoder, num_labels: int, num_heads: int = 1, adv_domains: int = 0, adv_weight: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.num_labels, self.num_heads, self.adv_weight = num_labels, num_heads, adv_weight
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(_hidden(encoder), num_labels * num_heads)
        self.domain_classifier = nn.Linear(_hidden(encoder), adv_domains) if adv_domains else None

    def logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        cls = _encode(self.encoder, batch).last_hidden_state[:, 0]
        logits = self.classifier(self.dropout(cls))
        if self.num_heads > 1:
            logits = logits.view(-1, self.num_heads, self.num_labels)
            logits = logits[torch.arange(logits.shape[0], device=logits.device), batch["domains"]]
        return logits, cls

    def forward(self, batch: dict) -> dict:
        logits, cls = self.logits(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        out = {"loss": loss, "label_loss": loss.detach()}
        if self.domain_classifier is not None:
            dom = self.domain_classifier(grad_reverse(cls))
            domain_loss = F.cross_entropy(dom.float(), batch["domains"])
            out.update(loss=loss + self.adv_weight * domain_loss, domain_loss=domain_loss.detach())
        return out


class MFTModel(nn.Module):
    """Encoder + :class:`fastmft.MFTLoss` (its heads are the only parameters added)."""

    def __init__(self, encoder, num_labels: int, num_domains: int, layers: Sequence[int], lam: float):
        super().__init__()
        self.encoder = encoder
        self.mft = MFTLoss(_hidden(encoder), num_labels, num_domains, layers, lam)

    def forward(self, batch: dict) -> dict:
        hidden = _encode(self.encoder, batch, hidden_states=True).hidden_states
        out = self.mft(
            hidden,
            batch["attention_mask"],
            batch["labels"],
            batch["domains"],
            typicality=batch.get("typicality"),
            corrupted=batch["corrupted"],
        )
        return {"loss": out.loss, "label_loss": out.label_loss.detach(), "domain_loss": out.domain_loss.detach()}


def _prepare_encoder(encoder, dropout: float | None):
    """A training copy: no pooler (MFT and the classifiers read token states; an unused pooler
    would stall DistributedDataParallel), dropout overridden when asked."""
    encoder = copy.deepcopy(encoder)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    if dropout is not None:
        for m in encoder.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(encoder.config, name):
                setattr(encoder.config, name, dropout)
    return encoder


# ----------------------------------------------------------------------------------------------
# checkpoints and metrics


class _Store:
    """The run folder: typicality, meta-learner, metrics, and the checkpoint: state.json (progress,
    results, metrics line count) with the model and optimizer of an unfinished phase, published as
    one unit (:class:`fastmft.runtime.files.CheckpointDir`)."""

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
        if self.folder is not None:
            if self.folder.exists() and not self.folder.is_dir():
                raise ValueError(f"--output-dir {self.folder} is a file, not a folder")
            if dist.main:
                self.folder.mkdir(parents=True, exist_ok=True)

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
            state = json.loads((folder / "state.json").read_text())
            if (folder / "model.safetensors").exists():
                from safetensors import safe_open

                with safe_open(str(folder / "model.safetensors"), "pt"):  # a readable header, or the previous one
                    pass
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
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
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

    def log(self, record: dict) -> None:
        if self.folder is None or not self.dist.main:
            return
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.state["metrics_lines"] += 1


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


def _load_training(store: _Store, model: nn.Module, optimizer, scheduler) -> None:
    from safetensors.torch import load_model

    load_model(model, str(store.loaded / "model.safetensors"), device=str(next(model.parameters()).device))
    states = torch.load(store.loaded / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])


# ----------------------------------------------------------------------------------------------
# the training loop


def _shuffle_within(values: Tensor, groups: Sequence[int], seed: int) -> Tensor:
    """``values`` permuted at random within each group (the placebo of per-instance weights)."""
    out = values.clone()
    g = torch.Generator().manual_seed(seed)
    groups_t = torch.as_tensor(list(groups))
    for k in groups_t.unique().tolist():
        idx = (groups_t == k).nonzero()[:, 0]
        out[idx] = values[idx[torch.randperm(len(idx), generator=g)]]
    return out


def _step_seed(seed: int, phase: int, step: int) -> int:
    return stream_seed(seed, phase, step)


def _warmup_linear(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warm = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _global_batches(lengths: Sequence[int], cfg: TrainConfig, seed: int, epoch: int, world: int) -> list[list[int]]:
    sampler = LengthBucketSampler(lengths, cfg.batch_size, seed=seed)
    sampler.set_epoch(epoch)
    # Each rank needs at least one row of every global batch.
    return [b for b in sampler if len(b) >= world]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Run:
    """One run of one method: the phases, resumable, over the same store."""

    def __init__(self, cfg: TrainConfig, encoder, tokenizer, data: TrainData, store: _Store, dist: Dist):
        self.cfg, self.data, self.store, self.dist = cfg, data, store, dist
        self.tokenizer = tokenizer
        self.collate = Collator(tokenizer.pad_token_id or 0)
        self.base = _prepare_encoder(encoder, cfg.dropout).cpu()
        self.num_labels, self.num_domains = len(data.label_vocab), len(data.domain_vocab)
        self.config_dict = cfg.to_dict()
        self.config_dict.update(
            num_labels=self.num_labels,
            num_domains=self.num_domains,
            train_rows=len(data.train),
            eval_rows=len(data.eval),
        )
        self.autocast = dist.device.type == "cuda" and cfg.bf16

        self.stopped = False
        self.t0 = time.perf_counter()

    def _autocast(self):
        return torch.autocast(self.dist.device.type, torch.bfloat16, enabled=self.autocast)

    # -- phases ----------------------------------------------------------------------------
    def phases(self) -> list[str]:
        m = self.cfg.method
        domains = [f"domain:{d}" for d in range(self.num_domains)]
        if m in MFT_METHODS:
            return ["mft", *domains]
        if m == "s":
            return domains
        return ["joint"]

    def run(self) -> TrainResult:
        t0 = time.perf_counter()
        store = self.store
        store.load(self.config_dict)
        wall_before = store.state.get("wall_time_s", 0.0)
        if self.cfg.method in MFT_METHODS and self.cfg.mft_epochs > 0 and store.state["phase"] == 0:
            self.typicality = self._typicality() if self.cfg.method != "dc" else None
        phases = self.phases()
        meta = None
        while store.state["phase"] < len(phases) and not self.stopped:
            idx = store.state["phase"]
            name = phases[idx]
            if name == "mft":
                self._phase_mft(idx)
            else:
                if meta is None and self.cfg.method in MFT_METHODS:
                    meta = self._meta_encoder()
                self._phase_classifier(idx, name, meta)
            if not self.stopped:
                store.state.update(phase=idx + 1, epoch=0, batch=0)
                store.state["wall_time_s"] = wall_before + time.perf_counter() - t0
                store.save(self.config_dict)  # without the phase's model: its checkpoint is spent
                self.dist.barrier()
        wall = wall_before + time.perf_counter() - t0
        store.state["wall_time_s"] = wall
        store.save(self.config_dict)
        return self._result(wall)

    def _result(self, wall: float) -> TrainResult:
        per_domain, dev_per_domain = {}, {}
        for k, name in enumerate(self.data.domain_vocab.values):
            r = self.store.state["results"].get(str(k))
            if r is not None:
                per_domain[str(name)] = r
            r = self.store.state.get("dev_results", {}).get(str(k))
            if r is not None:
                dev_per_domain[str(name)] = r
        done = not self.stopped and len(per_domain) == self.num_domains
        acc = sum(r["accuracy"] for r in per_domain.values()) / max(1, len(per_domain))
        f1 = sum(r["macro_f1"] for r in per_domain.values()) / max(1, len(per_domain))
        result = TrainResult(
            self.cfg.method,
            per_domain,
            acc,
            f1,
            wall,
            done,
            self.config_dict,
            str(self.dist.device),
            self.store.state["global_step"],
            dev_per_domain,
        )
        if done and not self.store.state.get("result_logged"):
            self.store.state["result_logged"] = True
            self.store.log(
                {
                    "event": "result",
                    "method": result.method,
                    "accuracy": result.accuracy,
                    "macro_f1": result.macro_f1,
                    "wall_time_s": result.wall_time_s,
                    "steps": result.steps,
                }
            )
            self.store.save(self.config_dict)
        return result

    # -- typicality and meta-learner -----------------------------------------------------------
    def _typicality(self) -> Tensor:
        from safetensors.torch import load_file, save_file

        from fastmft.pipelines.typicality import score_dataset

        p = self.store.path("typicality.safetensors")
        if p is not None and p.is_file():
            scores = load_file(str(p))["typicality"]
        else:
            encoder = copy.deepcopy(self.base).to(self.dist.device)
            with self._autocast():
                scores = score_dataset(
                    encoder,
                    self.data.train,
                    self.num_labels,
                    self.num_domains,
                    alpha=self.cfg.alpha,
                    num_prototypes=self.cfg.num_prototypes,
                    batch_size=max(self.cfg.batch_size, 32),
                    device=self.dist.device,
                    pad_token_id=self.tokenizer.pad_token_id or 0,
                    seed=self.cfg.seed,
                    progress=self.cfg.progress and self.dist.main,
                ).scores
            del encoder
            if p is not None and self.dist.main:
                atomic_path(p, lambda tmp: save_file({"typicality": scores.contiguous()}, tmp))
        if len(scores) != len(self.data.train):
            raise ValueError(f"{p} holds {len(scores)} scores for {len(self.data.train)} training rows")
        return scores.float()

    def _meta_encoder(self):
        from safetensors.torch import load_model

        encoder = copy.deepcopy(self.base)
        p = self.store.path("meta_encoder.safetensors")
        if self.cfg.mft_epochs > 0:
            if getattr(self, "_meta", None) is not None:
                encoder.load_state_dict(self._meta.state_dict())
            else:
                load_model(encoder, str(p))
        return encoder

    def _phase_mft(self, idx: int) -> None:
        cfg = self.cfg
        if cfg.mft_epochs == 0:
            return
        rows = _rows(self.data.train)
        if self.typicality is not None:
            t_rows = self.typicality
            if cfg.placebo:
                t_rows = _shuffle_within(t_rows, [r["domains"] for r in rows], cfg.seed)
            for r, t in zip(rows, t_rows.tolist()):
                r["typicality"] = t
        layers = cfg.layers or skip_layers(self.base.config.num_hidden_layers)
        lam = 0.0 if cfg.method == "tw" else cfg.lam
        torch.manual_seed(_step_seed(cfg.seed, idx, -1))
        model = MFTModel(copy.deepcopy(self.base), self.num_labels, self.num_domains, layers, lam)
        self._train(idx, "mft", model, rows, cfg.mft_epochs, cfg.mft_lr or cfg.lr, corrupt=True)
        if self.stopped:
            return
        self._meta = copy.deepcopy(model.encoder).cpu()  # the heads are dropped here
        if self.store.folder is not None and self.dist.main:
            from safetensors.torch import save_model

            atomic_path(self.store.path("meta_encoder.safetensors"), lambda tmp: save_model(self._meta, tmp))
        self.dist.barrier()

    def _phase_classifier(self, idx: int, name: str, meta) -> None:
        cfg = self.cfg
        encoder = copy.deepcopy(meta if meta is not None else self.base)
        rows = _rows(self.data.train)
        eval_rows = _rows(self.data.eval)
        torch.manual_seed(_step_seed(cfg.seed, idx, -1))  # the fresh classifier
        if name == "joint":
            model = Classifier(
                encoder,
                self.num_labels,
                num_heads=self.num_domains if cfg.method == "mtl" else 1,
                adv_domains=self.num_domains if cfg.method == "adv" else 0,
                adv_weight=cfg.adv_weight,
            )
            domains = list(range(self.num_domains))
        else:
            k = int(name.split(":")[1])
            model = Classifier(encoder, self.num_labels)
            rows = [r for r in rows if r["domains"] == k]
            domains = [k]
        self._train(idx, name, model, rows, cfg.epochs, cfg.lr)
        if self.stopped:
            return
        dev_rows = _rows(self.data.dev) if self.data.dev is not None else None
        for k in domains:
            self.store.state["results"][str(k)] = self._evaluate(model, [r for r in eval_rows if r["domains"] == k], k)
            if dev_rows is not None:
                self.store.state.setdefault("dev_results", {})[str(k)] = self._evaluate(
                    model, [r for r in dev_rows if r["domains"] == k], k, split="dev"
                )
        if cfg.save_models and self.store.folder is not None and self.dist.main:
            from safetensors.torch import save_model

            (self.store.folder / "models").mkdir(exist_ok=True)
            atomic_path(
                self.store.folder / "models" / f"{name.replace(':', '_')}.safetensors",
                lambda tmp: save_model(model, tmp),
            )

    # -- loops ---------------------------------------------------------------------------------
    def _train(
        self, idx: int, name: str, model: nn.Module, rows: list[dict], epochs: int, lr: float, corrupt: bool = False
    ) -> None:
        cfg, dist, store = self.cfg, self.dist, self.store
        model.to(dist.device)
        lengths = [len(r["input_ids"]) for r in rows]
        seed = cfg.seed * 7919 + idx
        per_epoch = len(_global_batches(lengths, cfg, seed, 0, dist.world))
        total = per_epoch * epochs
        # Weight decay on matrices only (not on biases and LayerNorm weights), as BERT does.
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(max(1, total), cfg.warmup_ratio))
        state = store.state
        resumed = state["phase"] == idx and (state["epoch"] > 0 or state["batch"] > 0)
        if resumed:
            _load_training(store, model, optimizer, scheduler)
        wrapped = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
            )
        from tqdm.auto import tqdm

        label = f"{METHOD_NAMES[cfg.method]} {name if not name.startswith('domain:') else self.data.domain_vocab.values[int(name[7:])]}"
        bar = tqdm(
            total=total,
            initial=state["epoch"] * per_epoch + state["batch"],
            desc=label,
            unit="step",
            disable=not (cfg.progress and dist.main),
            dynamic_ncols=True,
        )
        phase_step = state["epoch"] * per_epoch + state["batch"]
        first_bad = torch.full((), -1, dtype=torch.long, device=dist.device)  # first step with a non-finite loss

        def check_finite() -> None:
            if dist.sum((first_bad >= 0).float()).item():  # every rank calls this at the same points
                step = int(first_bad.item())
                raise FloatingPointError(
                    f"{label}: the loss is not finite at step {step if step > 0 else '(on another rank)'} of this phase; "
                    "the last checkpoint is left as it was. Lower --lr / --mft-lr or check the data and options"
                )

        for epoch in range(state["epoch"], epochs):
            batches = _global_batches(lengths, cfg, seed, epoch, dist.world)
            model.train()
            for b in range(state["batch"] if epoch == state["epoch"] else 0, len(batches)):
                if (cfg.stop_after_steps is not None and state["global_step"] >= cfg.stop_after_steps) or (
                    cfg.stop_after_seconds is not None and time.perf_counter() - self.t0 >= cfg.stop_after_seconds
                ):
                    state.update(epoch=epoch, batch=b)
                    check_finite()
                    store.save(self.config_dict, model, optimizer, scheduler)
                    dist.barrier()
                    self.stopped = True
                    bar.close()
                    return
                step_seed = _step_seed(cfg.seed, idx, phase_step)
                torch.manual_seed(step_seed)
                global_rows = [rows[i] for i in batches[b]]
                n_global = len(global_rows)
                batch = self.collate(global_rows[dist.rank :: dist.world])
                if corrupt:
                    domains = torch.tensor([r["domains"] for r in global_rows])
                    g = torch.Generator().manual_seed(step_seed)
                    batch["corrupted"] = shuffle_domains(domains, g)[dist.rank :: dist.world]
                batch = _to(batch, dist.device)
                n_local = batch["input_ids"].shape[0]
                with self._autocast():
                    out = wrapped(batch)
                # Remembered on the device (no host read per step) and checked where the loop reads
                # the host anyway: before every log line and checkpoint, so none holds a NaN step.
                first_bad = torch.where(
                    ~torch.isfinite(out["loss"].detach()) & (first_bad < 0), phase_step + 1, first_bad
                )
                # Every loss here is a mean over this rank's rows: rescale so that DDP's average of
                # the ranks' gradients is the gradient of the mean over the global batch.
                scale = n_local * dist.world / n_global
                (out["loss"] * scale).backward()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if cfg.max_grad_norm > 0
                    else None
                )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                phase_step += 1
                state["global_step"] += 1
                state.update(epoch=epoch, batch=b + 1)
                if cfg.log_every and (phase_step % cfg.log_every == 0 or phase_step == total):
                    check_finite()
                    logs = {k: dist.sum(v.detach().float() * n_local / n_global).item() for k, v in out.items()}
                    record = {
                        "event": "step",
                        "phase": name,
                        "epoch": epoch,
                        "step": phase_step,
                        "global_step": state["global_step"],
                        "lr": scheduler.get_last_lr()[0],
                        **logs,
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    store.log(record)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                bar.update(1)
                if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                    check_finite()
                    store.save(self.config_dict, model, optimizer, scheduler)
            state.update(epoch=epoch + 1, batch=0)
            check_finite()
            if epoch + 1 < epochs:
                store.save(self.config_dict, model, optimizer, scheduler)
        bar.close()

    @torch.no_grad()
    def _evaluate(self, model: Classifier, rows: list[dict], k: int, split: str = "eval") -> dict:
        model.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        preds = [0] * len(rows)
        bs = max(self.cfg.batch_size, 32)
        for s in range(0, len(order), bs):
            chunk = order[s : s + bs]
            batch = _to(self.collate([rows[i] for i in chunk]), self.dist.device)
            with self._autocast():
                logits, _ = model.logits(batch)
            for i, p in zip(chunk, logits.argmax(-1).tolist()):
                preds[i] = p
        gold = [r["labels"] for r in rows]
        result = {"accuracy": accuracy(gold, preds), "macro_f1": macro_f1(gold, preds), "n": len(rows)}
        self.store.log({"event": "eval", "split": split, "domain": str(self.data.domain_vocab.values[k]), **result})
        return {**result, "predictions": preds}  # per row, for paired tests (McNemar, bootstrap)


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(int(g == p) for g, p in zip(gold, pred)) / max(1, len(gold))


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes in gold or pred (as scikit-learn)."""
    classes = sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, len(scores))


# ----------------------------------------------------------------------------------------------
# public API


def _load_encoder(backbone):
    """(encoder, tokenizer): a (model, tokenizer) pair passes through; else load_backbone."""
    if isinstance(backbone, tuple):
        return backbone
    from fastmft.runtime.backbone import load_backbone

    return load_backbone(backbone)


def train(
    config: TrainConfig | None = None,
    *,
    data: TrainData | None = None,
    source=None,
    eval_source=None,
    columns: Columns = Columns(),
    backbone=None,
    output_dir: str | os.PathLike | None = None,
    **overrides,
) -> TrainResult:
    """Run one method end to end and return its per-domain results.

    ``backbone``: a local folder, a cached Hugging Face name, a ``(model, tokenizer)`` pair, or
    None for the default MiniLM. ``data``: a :class:`TrainData` (e.g. from :func:`load_data`);
    otherwise ``source`` (and ``eval_source``) are loaded with ``columns``; neither: the embedded
    synthetic corpus. ``output_dir``: metrics.jsonl, checkpoints and results; an existing run there
    is resumed. ``overrides``: TrainConfig fields (e.g. ``method="s", epochs=3``)."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    dist = Dist(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = _load_encoder(backbone)
    _check_encoder(encoder, cfg, tokenising=data is None)
    store = _Store(output_dir, dist)
    if data is None:
        data = _default_data(source, eval_source, columns, tokenizer, cfg)
    result = _Run(cfg, encoder, tokenizer, data, store, dist).run()
    if store.folder is not None and dist.main and result.complete:
        atomic_write(store.folder / "result.json", lambda f: f.write(json.dumps(result.to_dict(), indent=1)), mode="w")
    return result


def _default_data(source, eval_source, columns, tokenizer, cfg: TrainConfig) -> TrainData:
    if source is None:
        from fastmft.data.synthetic import synthetic_dataset

        source, columns = synthetic_dataset(), Columns()
    return load_data(
        source,
        tokenizer,
        columns,
        eval_source=eval_source,
        max_length=cfg.max_length,
        pair_join=cfg.pair_join,
        few_shot=cfg.few_shot,
        seed=cfg.seed,
    )


def compare(
    methods: Sequence[str],
    config: TrainConfig | None = None,
    *,
    data: TrainData | None = None,
    source=None,
    eval_source=None,
    columns: Columns = Columns(),
    backbone=None,
    output_dir=None,
    **overrides,
) -> dict[str, TrainResult]:
    """:func:`train` for each method on the same data (tokenised once); output_dir/<method> each."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    encoder, tokenizer = _load_encoder(backbone)
    if data is None:
        data = _default_data(source, eval_source, columns, tokenizer, cfg)
    results = {}
    for m in methods:
        key = method_key(m)
        out = None if output_dir is None else Path(output_dir) / key
        results[key] = train(cfg, data=data, backbone=(encoder, tokenizer), output_dir=out, method=key)
    return results


def meta_train(config: TrainConfig | None = None, *, data: TrainData, backbone=None, output_dir=None, **overrides):
    """Steps 1-3 alone (typicality, MFT epochs, heads dropped): returns the meta-learned encoder
    (the backbone's class, without its pooler), e.g. to fine-tune it with your own trainer."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    if cfg.method not in MFT_METHODS:
        raise ValueError(f"meta_train runs an MFT method (dc, tw, full), not {cfg.method!r}")
    dist = Dist(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = _load_encoder(backbone)
    run = _Run(cfg, encoder, tokenizer, data, _Store(output_dir, dist), dist)
    run.store.load(run.config_dict)
    run.typicality = run._typicality() if cfg.method != "dc" else None
    if run.store.state["phase"] == 0:
        run._phase_mft(0)
        if run.stopped:
            raise RuntimeError("stop_after_steps cut meta-training short")
    return run._meta_encoder()


def format_table(results: dict[str, TrainResult], metric: str = "accuracy") -> str:
    """Per-domain accuracy (or macro_f1) in %, one column per method, with the average row."""
    methods = list(results)
    domains: list[str] = []
    for r in results.values():
        domains += [d for d in r.per_domain if d not in domains]
    head = ["domain", *[METHOD_NAMES[m] for m in methods]]
    rows = [
        [d, *[f"{100 * results[m].per_domain[d][metric]:.1f}" if d in results[m].per_domain else "-" for m in methods]]
        for d in domains
    ]
    rows.append(["Average", *[f"{100 * getattr(results[m], metric):.1f}" for m in methods]])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda row: (
        "| "
        + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        + " |"
    )
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *map(fmt, rows)])


# ----------------------------------------------------------------------------------------------
# CLI


def _check_encoder(encoder, cfg: TrainConfig, tokenising: bool = True) -> None:
    """The options that depend on the encoder, before any data is tokenised or encoded
    (max_length only matters when fastmft tokenises the data itself)."""
    from fastmft.runtime.backbone import check_max_length

    if tokenising:
        check_max_length(encoder, cfg.max_length)
    depth = encoder.config.num_hidden_layers
    if cfg.layers and max(cfg.layers) > depth:
        raise ValueError(f"--layers {','.join(map(str, cfg.layers))}: the encoder has {depth} layers")
