"""Options and argument types that several ``fastmft`` commands share (argparse only: importing
this module costs nothing)."""

from __future__ import annotations

import argparse
import math
import textwrap


def add_column_arguments(parser) -> None:
    """The column-name options every ``fastmft`` command shares (argparse)."""
    parser.add_argument("--text-column", default="text", help="column of the text")
    parser.add_argument("--text-pair-column", help="second text of sentence pairs (premise/hypothesis) or word pairs")
    parser.add_argument("--label-column", default="label", help="column of the class label")
    parser.add_argument("--domain-column", default="domain", help="column of the domain")


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
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


def shorten(text: str, width: int = 80) -> str:
    """One line of at most ``width`` characters, cut at a word with an ellipsis when longer."""
    return textwrap.shorten(text, width=width, placeholder=" …")
