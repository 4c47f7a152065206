"""``fastmft typicality``: score a corpus in memory and show its most and least typical rows per
domain (the MFT paper's Table 5)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmft.data.synthetic import SYNTHETIC_PER_DOMAIN

from .options import (
    add_backbone_arguments,
    add_data_arguments,
    add_encoder_arguments,
    add_precision_arguments,
    add_runtime_arguments,
)


def register_cli(subparsers, help: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("typicality", help=help)
    add_data_arguments(p)
    add_backbone_arguments(p)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the own-domain prototype (default 0.5)")
    p.add_argument("--prototypes", type=int, default=1, help="prototypes per (domain, label) cell, J (default 1)")
    add_encoder_arguments(p, "typicality", seed_help="seed of the multi-prototype k-means (J > 1)")
    add_precision_arguments(p)
    p.add_argument("--top", type=int, default=3, help="instances to show per domain at each end (default 3)")
    p.add_argument(
        "--synthetic-per-domain",
        type=int,
        default=SYNTHETIC_PER_DOMAIN,
        help=f"rows per domain of the synthetic corpus without --data (default {SYNTHETIC_PER_DOMAIN}, as `fastmft train`)",
    )
    p.add_argument("--output", help="write {id, domain, label, typicality} per row as JSON lines")
    p.add_argument(
        "--plot", metavar="PNG", help="draw the typicality distribution per domain into this PNG (needs matplotlib)"
    )
    add_runtime_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fastmft.data.synthetic import synthetic_dataset
    from fastmft.pipelines.typicality import score_dataset
    from fastmft.pipelines.typicality.report import DomainReport, shorten
    from fastmft.runtime.backbone import load_backbone
    from fastmft.runtime.dist import pick_device
    from fastmft.runtime.precision import merge_quantize_alias, resolve_precision

    from ..data import Columns, prepare

    if args.plot:
        from fastmft.pipelines.plots import check_plot_path

        check_plot_path(args.plot)  # before the encoder runs, not after
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    columns = Columns(args.text_column, args.label_column, args.domain_column, args.text_pair_column, args.id_column)
    source = args.data if args.data else synthetic_dataset(args.synthetic_per_domain)
    if not args.data and columns.id is None:
        columns = Columns(id="id")
    model, tokenizer = load_backbone(args.backbone, trust_remote_code=args.trust_remote_code)
    device = pick_device(args.device)
    precision = resolve_precision(merge_quantize_alias(args.precision, args.quantize), device)
    model.to(device)
    data = prepare(source, tokenizer, columns, max_length=args.max_length, split=args.split)
    ds = data.dataset
    print(
        f"{len(ds)} rows, {len(data.domain_vocab)} domains {data.domain_vocab.values}, "
        f"{len(data.label_vocab)} labels {data.label_vocab.values}; backbone {args.backbone or 'all-MiniLM-L6-v2 (default)'} on {device}, "
        f"{precision} encoder (pooling, prototypes and typicality in fp32)"
    )
    result = score_dataset(
        model,
        ds,
        len(data.label_vocab),
        len(data.domain_vocab),
        alpha=args.alpha,
        num_prototypes=args.prototypes,
        batch_size=args.batch_size,
        device=device,
        pad_token_id=tokenizer.pad_token_id or 0,
        seed=args.seed,
        progress=not args.no_progress,
        precision=precision,
    )
    scores = result.scores.numpy()
    ids = ds[columns.id] if columns.id else list(range(len(ds)))
    texts, labels, domains = ds[columns.text], ds["labels"], ds["domains"]
    report = DomainReport(len(data.domain_vocab), args.top)
    report.add(scores, np.asarray(domains), np.arange(len(ds)), range(len(ds)))
    for k, domain in enumerate(data.domain_vocab.values):
        print(f"\n== domain {domain}: {report.rows(k)} rows, mean typicality {report.mean(k) or 0.0:.3f}")
        for title, chosen in (("most typical", report.most_typical(k)), ("least typical", report.least_typical(k))):
            print(f"  {title}:")
            for score, i in chosen:
                print(f"    {score:+.3f}  [{data.label_vocab.values[labels[i]]}] {shorten(texts[i])}  ({ids[i]})")
    if args.output:
        out = Path(args.output)
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
    if args.plot:
        from fastmft.pipelines.plots import typicality_histogram

        names = [data.domain_vocab.values[k] for k in domains]
        print(f"wrote the typicality per domain to {typicality_histogram(scores, names, args.plot)}")
    return 0
