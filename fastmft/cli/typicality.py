"""``fastmft typicality``: score a corpus in memory and show its most and least typical rows per
domain (the MFT paper's Table 5)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmft.pipelines.typicality.config import TypicalityConfig

from .options import add_settings, config_from_args


def register_cli(subparsers, help: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("typicality", help=help)
    add_settings(p, TypicalityConfig)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return _run(config_from_args(TypicalityConfig, args))


def _run(cfg: TypicalityConfig) -> int:
    import numpy as np
    import torch

    from fastmft.data.synthetic import synthetic_dataset
    from fastmft.pipelines.typicality import score_dataset
    from fastmft.pipelines.typicality.report import DomainReport, shorten
    from fastmft.runtime.backbone import load_backbone
    from fastmft.runtime.dist import pick_device
    from fastmft.runtime.precision import merge_quantize_alias, resolve_precision

    from ..data import Columns, prepare

    if cfg.plot:
        from fastmft.pipelines.plots import check_plot_path

        check_plot_path(cfg.plot)  # before the encoder runs, not after
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    columns = Columns(cfg.text_column, cfg.label_column, cfg.domain_column, cfg.text_pair_column, cfg.id_column)
    source = cfg.data if cfg.data else synthetic_dataset(cfg.synthetic_per_domain)
    if not cfg.data and columns.id is None:
        columns = Columns(id="id")
    model, tokenizer = load_backbone(cfg.backbone, trust_remote_code=cfg.trust_remote_code)
    device = pick_device(cfg.device)
    precision = resolve_precision(merge_quantize_alias(cfg.precision, cfg.quantize), device)
    model.to(device)
    data = prepare(source, tokenizer, columns, max_length=cfg.max_length, split=cfg.split)
    ds = data.dataset
    print(
        f"{len(ds)} rows, {len(data.domain_vocab)} domains {data.domain_vocab.values}, "
        f"{len(data.label_vocab)} labels {data.label_vocab.values}; backbone {cfg.backbone or 'all-MiniLM-L6-v2 (default)'} on {device}, "
        f"{precision} encoder (pooling, prototypes and typicality in fp32)"
    )
    result = score_dataset(
        model,
        ds,
        len(data.label_vocab),
        len(data.domain_vocab),
        alpha=cfg.alpha,
        num_prototypes=cfg.prototypes,
        batch_size=cfg.batch_size,
        device=device,
        pad_token_id=tokenizer.pad_token_id or 0,
        seed=cfg.seed,
        progress=cfg.progress,
        precision=precision,
    )
    scores = result.scores.numpy()
    ids = ds[columns.id] if columns.id else list(range(len(ds)))
    texts, labels, domains = ds[columns.text], ds["labels"], ds["domains"]
    report = DomainReport(len(data.domain_vocab), cfg.top)
    report.add(scores, np.asarray(domains), np.arange(len(ds)), range(len(ds)))
    for k, domain in enumerate(data.domain_vocab.values):
        print(f"\n== domain {domain}: {report.rows(k)} rows, mean typicality {report.mean(k) or 0.0:.3f}")
        for title, chosen in (("most typical", report.most_typical(k)), ("least typical", report.least_typical(k))):
            print(f"  {title}:")
            for score, i in chosen:
                print(f"    {score:+.3f}  [{data.label_vocab.values[labels[i]]}] {shorten(texts[i])}  ({ids[i]})")
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for i in range(len(ds)):
                f.write(
                    json.dumps(
                        {
                            "id": ids[i],
                            "domain": data.domain_vocab.values[domains[i]],
                            "label": data.label_vocab.values[labels[i]],
                            "typicality": float(scores[i]),
                        }
                    )
                    + "\n"
                )
        print(f"\nwrote {len(ds)} scores to {out}")
    if cfg.plot:
        from fastmft.pipelines.plots import typicality_histogram

        names = [data.domain_vocab.values[k] for k in domains]
        print(f"wrote the typicality per domain to {typicality_histogram(scores, names, cfg.plot)}")
    return 0
