"""``fastmft train``: its options and the command (the library code is fastmft.pipelines.trainer).

The training options are made from the fields of :class:`TrainConfig` (name, type, default and
help text), and the config is made back from them; the options declared here are the ones that are
not config fields: the data, the backbone, the output, and --method, which names several methods."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastmft.data.synthetic import SYNTHETIC_PER_DOMAIN

# Only the torch-free config is imported here, so that `fastmft train --help` does not load torch.
from fastmft.pipelines.trainer.config import METHOD_NAMES, METHODS, TrainConfig, method_key
from fastmft.runtime.settings import (
    backbone_setting,
    column_settings,
    setting,
    threads_setting,
    trust_remote_code_setting,
)

# --method takes several methods, one run each, so it is declared with the other options here.
_NOT_OPTIONS = {"method"}


@dataclass
class TrainRun:
    """The options of ``fastmft train`` that are not TrainConfig fields: the data, the backbone, the output."""

    data: str | None = setting(
        None, "JSONL/CSV/Parquet file(s) or glob, or a saved dataset folder (default: the synthetic corpus)"
    )
    eval_data: str | None = setting(
        None, "evaluation rows (default: the rows of `data` whose split column is `eval_split`)"
    )
    train_split: str = setting("train", "value of the split column that marks training rows")
    eval_split: str = setting("test", "value of the split column that marks evaluation rows")
    split_column: str = setting("split", "column that tells training from evaluation rows")
    text_column: str = column_settings()["text_column"]
    text_pair_column: str | None = column_settings()["text_pair_column"]
    label_column: str = column_settings()["label_column"]
    domain_column: str = column_settings()["domain_column"]
    synthetic_per_domain: int = setting(SYNTHETIC_PER_DOMAIN, "rows per domain of the synthetic corpus", low=1)
    backbone: str | None = backbone_setting()
    trust_remote_code: bool = trust_remote_code_setting()
    threads: int | None = threads_setting()
    output_dir: str | None = setting(
        None, "metrics.jsonl, checkpoints, result.json per method (an existing run resumes)"
    )
    metric: str = setting("accuracy", "the score of the table", choices=("accuracy", "macro_f1"))
    json: bool = setting(False, "also print the results as one JSON line per method")


def register_cli(subparsers, help: str) -> argparse.ArgumentParser:
    """Add ``train`` to the ``fastmft`` command's subparsers."""
    from .options import add_settings

    p = subparsers.add_parser(
        "train",
        help=help,
        description="Train one or several methods (comma-separated) and print the per-domain accuracy table. "
        "Without --data: the embedded synthetic corpus; without --backbone: all-MiniLM-L6-v2.",
    )
    p.add_argument(
        "--method", default=TrainConfig.method, help=f"comma-separated, from {', '.join(METHODS)}; e.g. full,s"
    )
    add_settings(p, TrainRun)
    add_settings(
        p.add_argument_group("training options (fastmft.pipelines.trainer.TrainConfig)"), TrainConfig, _NOT_OPTIONS
    )
    p.set_defaults(func=_cli_train)
    return p


def config_from_args(args: argparse.Namespace, method: str) -> TrainConfig:
    """The TrainConfig of the parsed options (each field from its option), for ``method``."""
    from .options import config_from_args

    return config_from_args(TrainConfig, args, method=method)


def _cli_train(args: argparse.Namespace) -> int:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [method_key(m) for m in args.method.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--method {args.method!r} names no method; choose from {', '.join(METHODS)}")
    if args.output_dir:  # before any loading: each method's run folder is writable and fastmft's
        from fastmft.runtime.files import check_run_folder

        for m in methods:
            out = Path(args.output_dir) / m if len(methods) > 1 else Path(args.output_dir)
            check_run_folder(out, "`output_dir`", legacy="checkpoint.json")
    try:
        return _cli_train_body(args, config_from_args(args, methods[0]), methods)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _cli_train_body(args: argparse.Namespace, cfg: TrainConfig, methods: list[str]) -> int:
    from fastmft.data import Columns
    from fastmft.pipelines.trainer import format_table, load_data, train
    from fastmft.pipelines.trainer.models import check_encoder
    from fastmft.runtime.dist import is_main_process

    t0 = time.perf_counter()
    from fastmft.runtime.backbone import load_backbone

    encoder, tokenizer = load_backbone(args.backbone, trust_remote_code=args.trust_remote_code)
    check_encoder(encoder, cfg)
    if args.data:
        columns = Columns(args.text_column, args.label_column, args.domain_column, args.text_pair_column)
        data = load_data(
            args.data,
            tokenizer,
            columns,
            eval_source=args.eval_data,
            train_split=args.train_split,
            eval_split=args.eval_split,
            split_column=args.split_column,
            max_length=cfg.max_length,
            pair_join=cfg.pair_join,
            few_shot=cfg.few_shot,
            seed=cfg.seed,
        )
    else:
        from fastmft.data.synthetic import synthetic_dataset

        data = load_data(
            synthetic_dataset(args.synthetic_per_domain),
            tokenizer,
            Columns(),
            max_length=cfg.max_length,
            few_shot=cfg.few_shot,
            seed=cfg.seed,
        )
    dist_main = is_main_process()
    if dist_main:
        print(
            f"{len(data.train)} training and {len(data.eval)} evaluation rows, {len(data.domain_vocab)} domains "
            f"{data.domain_vocab.values}, {len(data.label_vocab)} labels; backbone {args.backbone or 'all-MiniLM-L6-v2 (default)'}",
            flush=True,
        )
    results = {}
    for m in methods:
        out = (
            None
            if args.output_dir is None
            else (Path(args.output_dir) / m if len(methods) > 1 else Path(args.output_dir))
        )
        results[m] = train(cfg, data=data, backbone=(encoder, tokenizer), output_dir=out, method=m)
    if not dist_main:
        return 0
    if not all(r.complete for r in results.values()):
        print("stopped early at a checkpoint; run the same command again to resume")
        return 0
    counts = ", ".join(f"{d} {r['n']}" for d, r in next(iter(results.values())).per_domain.items())
    print(f"\n{args.metric} (%) per domain; evaluation rows: {counts}")
    print(format_table(results, args.metric))
    print(
        f"wall time {time.perf_counter() - t0:.0f} s ({', '.join(f'{METHOD_NAMES[m]} {r.wall_time_s:.0f} s' for m, r in results.items())}); "
        f"precision {next(iter(results.values())).precision}"
    )
    if args.json:
        for r in results.values():
            print(json.dumps({k: v for k, v in r.to_dict().items() if k != "config"}))
    return 0
