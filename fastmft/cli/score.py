"""``fastmft score``: its options and the command (the library code is the streaming mode of
fastmft.pipelines.typicality)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fastmft.pipelines.typicality.config import ScoreConfig

    from .options import add_settings

    add_settings(p, ScoreConfig)
    p.add_argument(
        "--plot", metavar="PNG", help="draw the typicality distribution per domain into this PNG (needs matplotlib)"
    )


def config_from_args(args: argparse.Namespace):
    """The ScoreConfig of the parsed options: every option is named after the field it sets."""
    from fastmft.pipelines.typicality.config import ScoreConfig

    from .options import config_from_args

    return config_from_args(ScoreConfig, args)


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
