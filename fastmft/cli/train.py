"""``fastmft train``: its options and the command (the library code is fastmft.pipelines.trainer)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fastmft.pipelines.trainer import METHOD_NAMES, METHODS, TrainConfig, format_table, load_data, method_key, train
from fastmft.pipelines.trainer.models import check_encoder

from ..data import Columns


def register_cli(subparsers, help: str) -> argparse.ArgumentParser:
    """Add ``train`` to the ``fastmft`` command's subparsers."""
    from fastmft.data.synthetic import SYNTHETIC_PER_DOMAIN

    from .options import add_column_arguments, positive_int

    p = subparsers.add_parser(
        "train",
        help=help,
        description="Train one or several methods (comma-separated) and print the per-domain accuracy table. "
        "Without --data: the embedded synthetic corpus; without --backbone: all-MiniLM-L6-v2.",
    )
    p.add_argument(
        "--method", default="full", help=f"comma-separated, from {', '.join(METHODS)} (default full); e.g. full,s"
    )
    p.add_argument(
        "--data", help="JSONL/CSV/Parquet file(s) or glob, or a saved dataset folder (default: the synthetic corpus)"
    )
    p.add_argument(
        "--eval-data", help="evaluation rows (default: the rows of --data whose split column is --eval-split)"
    )
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--split-column", default="split")
    add_column_arguments(p)
    p.add_argument(
        "--pair-join",
        action="store_true",
        help="join text and text pair into one text with the tokenizer's separator (word pairs)",
    )
    p.add_argument(
        "--synthetic-per-domain",
        type=int,
        default=SYNTHETIC_PER_DOMAIN,
        help=f"rows per domain of the synthetic corpus (default {SYNTHETIC_PER_DOMAIN})",
    )
    p.add_argument("--backbone", help="local model folder or cached Hugging Face name (default: all-MiniLM-L6-v2)")
    p.add_argument("--trust-remote-code", action="store_true")
    d = TrainConfig()
    p.add_argument("--mft-epochs", type=int, default=d.mft_epochs)
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="fine-tuning epochs (per domain, or pooled for mix/mtl/adv)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--mft-lr", type=float, help="learning rate of the MFT epochs (default --lr)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--lam", type=float, default=d.lam, help="weight lambda of L_SDC")
    p.add_argument("--layers", help="skip layers, 1-based, comma-separated (default: thirds of the depth)")
    p.add_argument("--prototypes", type=int, default=d.num_prototypes)
    p.add_argument("--adv-weight", type=float, default=d.adv_weight)
    p.add_argument(
        "--few-shot", type=float, default=d.few_shot, help="fraction of each domain's training rows, e.g. 0.05"
    )
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--dropout", type=float)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device")
    p.add_argument("--no-bf16", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--output-dir", help="metrics.jsonl, checkpoints, result.json per method (an existing run resumes)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--stop-after-steps", type=int, help="checkpoint and stop after this many steps (resume later)")
    p.add_argument(
        "--stop-after-seconds", type=float, help="checkpoint and stop once this run took this long (resume later)"
    )
    p.add_argument("--save-models", action="store_true")
    p.add_argument("--metric", choices=("accuracy", "macro_f1"), default="accuracy")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line per method")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli_train)
    return p


def _cli_train(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [method_key(m) for m in args.method.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--method {args.method!r} names no method; choose from {', '.join(METHODS)}")
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output-dir {args.output_dir} is a file, not a folder")
    cfg = TrainConfig(
        method=methods[0],
        mft_epochs=args.mft_epochs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        mft_lr=args.mft_lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        alpha=args.alpha,
        lam=args.lam,
        layers=_layers_arg(args.layers) if args.layers else None,
        num_prototypes=args.prototypes,
        adv_weight=args.adv_weight,
        few_shot=args.few_shot,
        max_length=args.max_length,
        pair_join=args.pair_join,
        dropout=args.dropout,
        seed=args.seed,
        device=args.device,
        bf16=not args.no_bf16,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        stop_after_steps=args.stop_after_steps,
        stop_after_seconds=args.stop_after_seconds,
        save_models=args.save_models,
        progress=not args.no_progress,
    )
    try:
        return _cli_train_body(args, cfg, methods)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _layers_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers (1-based layer numbers), got {text!r}") from None


def _cli_train_body(args: argparse.Namespace, cfg: TrainConfig, methods: list[str]) -> int:
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
    dist_main = int(os.environ.get("RANK", "0")) == 0
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
        f"wall time {time.perf_counter() - t0:.0f} s ({', '.join(f'{METHOD_NAMES[m]} {r.wall_time_s:.0f} s' for m, r in results.items())})"
    )
    if args.json:
        for r in results.values():
            print(json.dumps({k: v for k, v in r.to_dict().items() if k != "config"}))
    return 0
