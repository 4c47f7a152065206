"""``fastmft score``: its options and the command (the library code is the streaming mode of
fastmft.pipelines.typicality)."""

from __future__ import annotations

import argparse


def _csv_list(text: str) -> list[str]:
    return [v for v in (s.strip() for s in text.split(",")) if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import (
        add_backbone_arguments,
        add_column_arguments,
        add_encoder_arguments,
        add_precision_arguments,
        add_runtime_arguments,
    )

    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="JSONL/CSV/Parquet files, globs of shards (quote them), or saved-dataset folders",
    )
    p.add_argument(
        "--output", "-o", required=True, help="output Parquet file: id, domain, label, typicality per accepted row"
    )
    add_column_arguments(p)
    p.add_argument(
        "--id-column",
        help="row identifier, written as text (default: the input's 'id' column when it has one, else the 0-based row index)",
    )
    p.add_argument(
        "--label-values", type=_csv_list, help="comma-separated labels (default: inferred in a first cheap pass)"
    )
    p.add_argument(
        "--domain-values", type=_csv_list, help="comma-separated domains (default: inferred in a first cheap pass)"
    )
    p.add_argument("--format", choices=("json", "csv", "parquet"), help="input format (default: from the file suffix)")
    add_backbone_arguments(p)
    add_encoder_arguments(p, "score", seed_help="seed of the multi-prototype k-means (J > 1)")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=4096,
        help="rows per length-sorting window and cache chunk, the unit of resume (default 4096)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the own-domain prototype (default 0.5)")
    p.add_argument("--prototypes", type=int, default=1, help="prototypes per (domain, label) cell, J (default 1)")
    p.add_argument("--temperature", type=float, default=0.1, help="soft membership temperature for J > 1 (default 0.1)")
    add_precision_arguments(p)
    p.add_argument("--cache-dir", help="cache and resume folder (default: OUTPUT.score-cache)")
    p.add_argument(
        "--rejects", help="rejected rows as JSON lines with file, line, reason (default: OUTPUT.rejects.jsonl)"
    )
    p.add_argument("--report", help="write the top/bottom-k rows per domain to this JSON file")
    p.add_argument("--top-k", type=int, default=10, help="rows per domain and end in --report (default 10)")
    p.add_argument("--strict", action="store_true", help="a bad row is an error instead of a reject")
    p.add_argument("--restart", action="store_true", help="discard the cache of an earlier, different command")
    p.add_argument("--keep-cache", action="store_true", help="keep the embedding cache after success")
    add_runtime_arguments(p)
    p.add_argument(
        "--plot", metavar="PNG", help="draw the typicality distribution per domain into this PNG (needs matplotlib)"
    )


def config_from_args(args: argparse.Namespace):
    """The ScoreConfig of the parsed options: every option is named after the field it sets."""
    import dataclasses

    from fastmft.pipelines.typicality import ScoreConfig

    fields = {f.name for f in dataclasses.fields(ScoreConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    return ScoreConfig(**{**given, "inputs": list(args.inputs), "progress": not args.no_progress})


def _command(args: argparse.Namespace) -> int:
    from fastmft.pipelines import plots
    from fastmft.pipelines.typicality import score_files
    from fastmft.runtime.dist import is_main_process

    cfg = config_from_args(args)
    if args.plot:  # before any work, as score_files checks its own outputs
        from pathlib import Path

        from fastmft.pipelines.typicality.config import check_distinct_outputs

        plots.check_plot_path(args.plot)
        named = [("output", Path(cfg.output)), ("rejects", cfg.rejects_path()), ("plot", Path(args.plot))]
        named += [("report", Path(cfg.report))] if cfg.report else []
        check_distinct_outputs([*named, ("cache_dir", cfg.cache_path())])
    summary = score_files(cfg)
    if is_main_process():
        print(summary.text())
        if args.plot:
            print(f"plot: {plots.score_output_histogram(summary.output, args.plot)}")
    return 0


def register_cli(subparsers, help: str) -> argparse.ArgumentParser:
    """Add the ``score`` subcommand to ``fastmft``'s subparsers."""
    p = subparsers.add_parser(
        "score",
        help=help,
        description="Streaming, resumable, sharded typicality scoring of large corpora (fastmft.score_files).",
    )
    add_arguments(p)
    p.set_defaults(func=_command)
    return p
