"""What a trainer run is asked to do and what it returns: the methods, :class:`TrainConfig` (each
field with its help text, from which ``fastmft train`` builds its options) and
:class:`TrainResult`. Plain dataclasses: importing this module costs no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastmft.data import MAX_LENGTH
from fastmft.runtime.settings import check_settings, setting

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


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Defaults follow the paper (alpha 0.5, lambda 0.1, 1 MFT epoch,
    2 fine-tuning epochs) with the learning rate raised for the small default backbone."""

    method: str = setting("full", f"one of {', '.join(METHODS)} (or a name such as 'MFT(Full)')")
    mft_epochs: int = setting(1, "MFT epochs over all domains (dc, tw, full)", low=0)
    epochs: int = setting(2, "fine-tuning epochs: per domain (s and the MFT methods), pooled (mix, mtl, adv)", low=0)
    batch_size: int = setting(32, "global batch size (split over the ranks under torch.distributed)", low=1)
    lr: float = setting(
        5e-5, "peak learning rate (AdamW, linear warmup then linear decay per phase)", low=0.0, low_open=True
    )
    mft_lr: float | None = setting(
        None, "learning rate of the MFT epochs (default: the learning rate `lr`)", low=0.0, low_open=True
    )
    weight_decay: float = setting(0.01, "AdamW weight decay of the weight matrices", low=0.0)
    warmup_ratio: float = setting(
        0.1, "fraction of each phase's steps spent warming up the learning rate", low=0.0, high=1.0
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: no clipping)", low=0.0)
    alpha: float = setting(
        0.5, "typicality: weight of the own-domain prototype against the other domains'", low=0.0, high=1.0
    )
    lam: float = setting(0.1, "weight lambda of the domain-corruption loss L_SDC", low=0.0)
    layers: tuple[int, ...] | None = setting(
        None, "skip layers L_s, 1-based, comma-separated (default: thirds of the depth)"
    )
    num_prototypes: int = setting(1, "typicality prototypes per (domain, label) cell, J", option="prototypes", low=1)
    adv_weight: float = setting(0.1, "weight of BERT(Adv)'s domain loss (gradient reversal coefficient 1)", low=0.0)
    few_shot: float = setting(
        1.0,
        "fraction of each domain's training rows, stratified by label (e.g. 0.05)",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    placebo: bool = setting(False, "diagnostic: permute typicality within each domain (keeps per-domain weights only)")
    max_length: int = setting(MAX_LENGTH, "maximum tokens per row", low=2)
    pair_join: bool = setting(
        False, "join text and text pair into one text with the tokenizer's separator (word pairs)"
    )
    dropout: float | None = setting(
        None, "override the encoder's dropout probabilities (0 for exact DDP parity; default: the model's)"
    )
    seed: int = setting(0, "random seed of sampling, dropout, classifier initialisation and few-shot rows")
    device: str | None = setting(None, "torch device (default: this rank's cuda device when available, else cpu)")
    bf16: bool = setting(True, "autocast to bfloat16 on CUDA (when `precision` is not given)")
    precision: str | None = setting(
        None,
        "fp32 or bf16 (autocast, on CPU too) for the typicality pass and training (default: bf16 on CUDA, else fp32)",
    )
    log_every: int = setting(10, "steps between metric lines (0: none)", low=0)
    checkpoint_every: int = setting(0, "steps between mid-epoch checkpoints (0: at the end of each epoch only)", low=0)
    stop_after_steps: int | None = setting(
        None, "checkpoint and stop after this many steps in all (resume later; default: no limit)"
    )
    stop_after_seconds: float | None = setting(
        None, "time box: checkpoint and stop once this run took this long (resume later; default: no limit)"
    )
    save_models: bool = setting(False, "keep each final (per-domain) model as safetensors in output_dir/models")
    progress: bool = setting(True, "show progress bars")

    def __post_init__(self):
        self.method = method_key(self.method)
        if self.layers is not None:
            if not self.layers or not all(
                isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in self.layers
            ):
                raise ValueError(f"`layers` must be 1-based integer layer numbers, got {self.layers!r}")
            self.layers = tuple(self.layers)
        check_settings(self)
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
