"""``fastmft select``: its options and the command (the library code is fastmft.pipelines.selection)."""

from __future__ import annotations

from pathlib import Path

from fastmft.pipelines.selection.config import SelectConfig

from .options import add_settings, config_from_args


def _run_cli(args) -> int:
    from fastmft.runtime.files import claim_run_folder

    cfg = config_from_args(SelectConfig, args)
    lock = claim_run_folder(Path(cfg.output_dir), "`output_dir`", legacy="checkpoint")
    try:
        return _select(cfg, Path(cfg.output_dir))
    finally:
        lock.close()


def _select(cfg: SelectConfig, out: Path) -> int:
    import collections

    import torch

    from fastmft.data.synthetic import synthetic_dataset
    from fastmft.pipelines.selection import MultiTaskModel, TaskSelector, build_tasks
    from fastmft.runtime.backbone import check_max_length, load_backbone
    from fastmft.runtime.dist import pick_device

    from ..data import Columns, prepare

    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = load_backbone(cfg.backbone, trust_remote_code=cfg.trust_remote_code)
    check_max_length(encoder, cfg.max_length)
    columns = Columns(cfg.text_column, cfg.label_column, cfg.domain_column, cfg.text_pair_column)
    data = prepare(cfg.data or synthetic_dataset(), tokenizer, columns, max_length=cfg.max_length)
    if cfg.agnostic:
        target = None
    elif cfg.target_domain is None:
        target = len(data.domain_vocab) - 1
    else:
        target = data.domain_vocab.encode(cfg.target_domain)
    sources, targets = build_tasks(
        data.dataset,
        tokenizer,
        data.domain_vocab,
        len(data.label_vocab),
        target_domain=target,
        sources=cfg.sources,
        batch_size=cfg.batch_size,
        split_column=cfg.split_column,
        unlabeled_splits=None if cfg.unlabeled_splits == "all" else cfg.unlabeled_splits.split(","),
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
        inner_lr=cfg.inner_lr,
        lr=cfg.lr,
        m=cfg.m,
        n=cfg.n,
        epsilon=cfg.epsilon,
        seed=cfg.seed,
        inner=cfg.inner,
    )
    print(
        f"task selection ({selector.mode}): sources {[s.name for s in sources]}, targets {[t.name for t in targets or []]}, on {device}"
    )
    # weights plus AdamW's two moments: what an exact resume needs; the previous checkpoint is kept
    # as the fallback, so two at most
    size = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"writes {out / 'episodes.jsonl'} and checkpoints of about {size / 2**20:.0f} MB each in {out / 'checkpoint'} "
        "(a new one after every episode, the previous one kept; delete the folder when done)",
        flush=True,
    )
    history = selector.run(
        cfg.episodes, log=out / "episodes.jsonl", checkpoint=out / "checkpoint", progress=cfg.progress
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
    p = subparsers.add_parser("select", help=help)
    add_settings(p, SelectConfig)
    p.set_defaults(func=_run_cli)
