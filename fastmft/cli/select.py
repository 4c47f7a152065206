"""``fastmft select``: its options and the command (the library code is fastmft.pipelines.selection)."""

from __future__ import annotations

from pathlib import Path


def _run_cli(args) -> int:
    from fastmft.runtime.files import claim_run_folder

    if args.episodes < 0:
        raise ValueError(f"--episodes must be >= 0, got {args.episodes}")
    lock = claim_run_folder(Path(args.output_dir), "`output_dir`", legacy="checkpoint")
    try:
        return _select(args, Path(args.output_dir))
    finally:
        lock.close()


def _select(args, out: Path) -> int:
    import collections

    import torch

    from fastmft.data.synthetic import synthetic_dataset
    from fastmft.pipelines.selection import MultiTaskModel, TaskSelector, build_tasks
    from fastmft.runtime.backbone import check_max_length, load_backbone
    from fastmft.runtime.dist import pick_device

    from ..data import Columns, prepare

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    encoder, tokenizer = load_backbone(args.backbone, trust_remote_code=args.trust_remote_code)
    check_max_length(encoder, args.max_length)
    columns = Columns(args.text_column, args.label_column, args.domain_column, args.text_pair_column)
    data = prepare(args.data or synthetic_dataset(), tokenizer, columns, max_length=args.max_length)
    if args.agnostic:
        target = None
    elif args.target_domain is None:
        target = len(data.domain_vocab) - 1
    else:
        target = data.domain_vocab.encode(args.target_domain)
    sources, targets = build_tasks(
        data.dataset,
        tokenizer,
        data.domain_vocab,
        len(data.label_vocab),
        target_domain=target,
        sources=args.sources.split(","),
        batch_size=args.batch_size,
        split_column=args.split_column,
        unlabeled_splits=None if args.unlabeled_splits == "all" else args.unlabeled_splits.split(","),
    )
    for task in [*sources, *(targets or [])]:  # batches are drawn with replacement: more rows only repeat
        if task.batch_size > len(task.input_ids):
            print(
                f"--batch-size {task.batch_size}: task {task.name} has {len(task.input_ids)} rows; its batches hold that many"
            )
            task.batch_size = len(task.input_ids)
    model = MultiTaskModel(encoder, [*sources, *(targets or [])]).to(device)
    selector = TaskSelector(
        model,
        sources,
        targets,
        inner_lr=args.inner_lr,
        lr=args.lr,
        m=args.m,
        n=args.n,
        epsilon=args.epsilon,
        seed=args.seed,
        inner=args.inner,
    )
    print(
        f"task selection ({selector.mode}): sources {[s.name for s in sources]}, targets {[t.name for t in targets or []]}, on {device}"
    )
    # weights plus AdamW's two moments: what an exact resume needs, one checkpoint kept
    size = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"writes {out / 'episodes.jsonl'} and a checkpoint of about {size / 2**20:.0f} MB in {out / 'checkpoint'} "
        "(replaced after every episode; delete the folder when done)",
        flush=True,
    )
    history = selector.run(
        args.episodes, log=out / "episodes.jsonl", checkpoint=out / "checkpoint", progress=not args.no_progress
    )
    picks = collections.Counter(e.chosen for e in history)
    scoring, training = sum(e.scoring_s for e in history), sum(e.training_s for e in history)
    print(f"episodes run now: {len(history)} (total {selector.episodes_done}); picks: {dict(picks)}")
    print(
        f"time: scoring {scoring:.1f} s, training {training:.1f} s; log {out / 'episodes.jsonl'}, checkpoint {out / 'checkpoint'}"
    )
    return 0


def register_cli(subparsers, help: str) -> None:
    """Add ``fastmft select`` to the fastmft command line."""
    from .options import (
        add_backbone_arguments,
        add_column_arguments,
        add_encoder_arguments,
        add_runtime_arguments,
        positive_float,
        positive_int,
    )

    p = subparsers.add_parser("select", help=help)
    p.add_argument(
        "--data", help="multi-domain data (JSONL/CSV/Parquet/saved dataset; default: the embedded synthetic corpus)"
    )
    add_column_arguments(p)
    p.add_argument(
        "--split-column",
        default="split",
        help="train rows feed the source tasks, the target domain's dev rows the target (when the column exists)",
    )
    p.add_argument(
        "--unlabeled-splits",
        default="train",
        help="comma-separated splits whose texts feed mlm and shuffle (default train; 'all': every row, dev and test included)",
    )
    p.add_argument("--target-domain", help="downstream-aware target (default: the last domain)")
    p.add_argument("--agnostic", action="store_true", help="downstream-agnostic: the targets are the sources")
    p.add_argument(
        "--sources", default="mlm,domains", help="comma-separated: mlm, shuffle, domains (default mlm,domains)"
    )
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--m", type=positive_int, default=2, help="batches per task for scoring (M)")
    p.add_argument("--n", type=positive_int, default=4, help="training batches of the chosen task per episode (N)")
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--inner-lr", type=positive_float, default=1e-3, help="alpha of the inner step")
    p.add_argument(
        "--inner",
        choices=("sgd", "adam"),
        default="sgd",
        help="inner step: sgd (alpha = --inner-lr) or adam (the real AdamW step's look-ahead: its lr, its preconditioning)",
    )
    p.add_argument("--lr", type=positive_float, default=2e-5, help="AdamW learning rate of the real training")
    add_encoder_arguments(
        p, "select", seed_help="seed of task sampling, batches, dropout and the heads' initialisation"
    )
    add_backbone_arguments(p)
    add_runtime_arguments(p)
    p.add_argument(
        "--output-dir", default="runs/select", help="episode log and checkpoint; an existing checkpoint is resumed"
    )
    p.set_defaults(func=_run_cli)
