"""Per-domain scores (accuracy, macro-F1) and the comparison table of several methods."""

from __future__ import annotations

from typing import Sequence

from .config import METHOD_NAMES, TrainResult


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(int(g == p) for g, p in zip(gold, pred)) / max(1, len(gold))


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes in gold or pred (as scikit-learn)."""
    classes = sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, len(scores))


def format_table(results: dict[str, TrainResult], metric: str = "accuracy") -> str:
    """Per-domain accuracy (or macro_f1) in %, one column per method, with the average row."""
    methods = list(results)
    domains: list[str] = []
    for r in results.values():
        domains += [d for d in r.per_domain if d not in domains]
    head = ["domain", *[METHOD_NAMES[m] for m in methods]]
    rows = [
        [d, *[f"{100 * results[m].per_domain[d][metric]:.1f}" if d in results[m].per_domain else "-" for m in methods]]
        for d in domains
    ]
    rows.append(["Average", *[f"{100 * getattr(results[m], metric):.1f}" for m in methods]])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda row: (
        "| "
        + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        + " |"
    )
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *map(fmt, rows)])
