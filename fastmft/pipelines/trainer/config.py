"""What a trainer run is asked to do and what it returns: the methods, :class:`TrainConfig` (each
field with its help text, from which ``fastmft train`` builds its options) and
:class:`TrainResult`. Plain dataclasses: importing this module costs no torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

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


def _setting(default, help: str, option: str | None = None):
    """A config field with its help text; ``option``: its command-line name when not the field's."""
    return field(default=default, metadata={"help": help, "option": option})


def option_name(field_name: str) -> str:
    """The ``fastmft train`` option of a :class:`TrainConfig` field, without the leading dashes."""
    option = TrainConfig.__dataclass_fields__[field_name].metadata.get("option")
    return option or field_name.replace("_", "-")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Defaults follow the paper (alpha 0.5, lambda 0.1, 1 MFT epoch,
    2 fine-tuning epochs) with the learning rate raised for the small default backbone."""

    method: str = _setting("full", f"one of {', '.join(METHODS)} (or a name such as 'MFT(Full)')")
    mft_epochs: int = _setting(1, "MFT epochs over all domains (dc, tw, full)")
    epochs: int = _setting(2, "fine-tuning epochs: per domain (s and the MFT methods), pooled (mix, mtl, adv)")
    batch_size: int = _setting(32, "global batch size (split over the ranks under torch.distributed)")
    lr: float = _setting(5e-5, "peak learning rate (AdamW, linear warmup then linear decay per phase)")
    mft_lr: float | None = _setting(None, "learning rate of the MFT epochs (default: the learning rate `lr`)")
    weight_decay: float = _setting(0.01, "AdamW weight decay of the weight matrices")
    warmup_ratio: float = _setting(0.1, "fraction of each phase's steps spent warming up the learning rate")
    max_grad_norm: float = _setting(1.0, "gradient clipping norm (0: no clipping)")
    alpha: float = _setting(0.5, "typicality: weight of the own-domain prototype against the other domains'")
    lam: float = _setting(0.1, "weight lambda of the domain-corruption loss L_SDC")
    layers: tuple[int, ...] | None = _setting(
        None, "skip layers L_s, 1-based, comma-separated (default: thirds of the depth)"
    )
    num_prototypes: int = _setting(1, "typicality prototypes per (domain, label) cell, J", option="prototypes")
    adv_weight: float = _setting(0.1, "weight of BERT(Adv)'s domain loss (gradient reversal coefficient 1)")
    few_shot: float = _setting(1.0, "fraction of each domain's training rows, stratified by label (e.g. 0.05)")
    placebo: bool = _setting(False, "diagnostic: permute typicality within each domain (keeps per-domain weights only)")
    max_length: int = _setting(128, "maximum tokens per row")
    pair_join: bool = _setting(
        False, "join text and text pair into one text with the tokenizer's separator (word pairs)"
    )
    dropout: float | None = _setting(
        None, "override the encoder's dropout probabilities (0 for exact DDP parity; default: the model's)"
    )
    seed: int = _setting(0, "random seed of sampling, dropout, classifier initialisation and few-shot rows")
    device: str | None = _setting(None, "torch device (default: this rank's cuda device when available, else cpu)")
    bf16: bool = _setting(True, "autocast to bfloat16 on CUDA (when `precision` is not given)")
    precision: str | None = _setting(
        None,
        "fp32 or bf16 (autocast, on CPU too) for the typicality pass and training (default: bf16 on CUDA, else fp32)",
    )
    log_every: int = _setting(10, "steps between metric lines (0: none)")
    checkpoint_every: int = _setting(0, "steps between mid-epoch checkpoints (0: at the end of each epoch only)")
    stop_after_steps: int | None = _setting(
        None, "checkpoint and stop after this many steps in all (resume later; default: no limit)"
    )
    stop_after_seconds: float | None = _setting(
        None, "time box: checkpoint and stop once this run took this long (resume later; default: no limit)"
    )
    save_models: bool = _setting(False, "keep each final (per-domain) model as safetensors in output_dir/models")
    progress: bool = _setting(True, "show progress bars")

    def __post_init__(self):
        self.method = method_key(self.method)
        if self.layers is not None:
            if not self.layers or not all(
                isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in self.layers
            ):
                raise ValueError(f"`layers` must be 1-based integer layer numbers, got {self.layers!r}")
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
                raise ValueError(f"{name} (--{option_name(name)}) must be an integer >= {low}, got {value!r}")
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
                    f"{name} (--{option_name(name)}) must be a finite number {'in ' if high < math.inf else ''}{span}, got {value!r}"
                )
        if self.mft_lr is not None and not (math.isfinite(self.mft_lr) and self.mft_lr > 0):
            raise ValueError(f"`mft_lr` must be a finite number > 0, got {self.mft_lr!r}")
        if self.precision not in (None, "fp32", "bf16"):
            hint = "; int8 is a scoring mode (fastmft score, typicality)" if self.precision == "int8" else ""
            raise ValueError(f"`precision` must be fp32 or bf16, got {self.precision!r}{hint}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {self.dropout!r}")

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
    precision: str = ""  # the precision that ran: fp32 or bf16 (autocast)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
