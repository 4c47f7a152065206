"""``fastmft demo-data``: write the embedded synthetic corpus as JSON lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register_cli(subparsers, help: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo-data", help=help)
    p.add_argument("output")
    p.add_argument("--per-domain", type=int, default=64)
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastmft.data.synthetic import synthetic_corpus

    rows = synthetic_corpus(args.per_domain, domains=args.domains, seed=args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {out}")
    return 0
