"""Figures of the committed experiments: ``python -m benchmarks.experiments.figures [--out DIR | --record]``.

- ``table3.png``: the Amazon Table 3 reproduction (``results/amazon_table3/<method>_seed<s>.json``)
  as grouped bars, test accuracy per domain and on average, mean over the finished seeds with the
  sample standard deviation as error bars (the numbers of its TABLE.md);
- ``picks.png``: the task each schedule trained on in each episode of the task-selection
  experiment (``results/select_amazon/*.json``), one row per (schedule, seed), with the test
  accuracy of each row.

Written to ``runs/figures/`` (untracked) by default; ``--record`` writes them next to their data in
``benchmarks/experiments/results/`` (the copies the README shows). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOCAL_OUT = Path(__file__).resolve().parents[2] / "runs" / "figures"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "benchmarks.experiments.figures: error: needs matplotlib: `.venv/bin/pip install matplotlib`"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes
    return path


def table3(folder: Path, path: Path) -> Path:
    from fastmft.pipelines.trainer import METHOD_NAMES, METHODS

    cells: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*_seed*.json")):
        cell = json.loads(f.read_text())
        cells.setdefault(cell["method"], []).append(cell)
    if not cells:
        raise SystemExit(f"benchmarks.experiments.figures: error: no <method>_seed<s>.json in {folder}")
    methods = [m for m in METHODS if m in cells]
    domains = sorted({d for cs in cells.values() for c in cs for d in c["accuracy"]})
    groups = [*domains, "average"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        per = [[100 * c["accuracy"][d] for c in cells[m]] for d in domains] + [
            [100 * c["average_accuracy"] for c in cells[m]]
        ]
        means = [statistics.fmean(v) for v in per]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per]
        n = len(cells[m])
        ax.bar(
            [g + (j - (len(methods) - 1) / 2) * width for g in range(len(groups))],
            means,
            width,
            yerr=stds,
            capsize=2,
            label=f"{METHOD_NAMES[m]} ({n} seed{'s' if n > 1 else ''})",
        )
    lows = [100 * min(min(c["accuracy"].values()) for c in cs) for cs in cells.values()]
    ax.set_ylim(min(lows) - 4, 100)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Amazon reviews, MiniLM: MFT against the baselines (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def picks(folder: Path, path: Path) -> Path:
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    if not runs:
        raise SystemExit(f"benchmarks.experiments.figures: error: no selection results (*.json) in {folder}")
    runs.sort(key=lambda r: (r["schedule"] != "selected", r["schedule"], r["seed"]))
    tasks = sorted({t for r in runs for t in r["picks"]})
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    grid = [[tasks.index(t) for t in r["picks"]] for r in runs]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(runs) + 1.6))
    cmap = ListedColormap(plt.get_cmap("tab10").colors[: len(tasks)])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(tasks) - 0.5, interpolation="nearest")
    ax.set_yticks(
        range(len(runs)), [f"{r['schedule']} seed {r['seed']} ({100 * r['test_accuracy']:.1f} %)" for r in runs]
    )
    episodes = max(len(r["picks"]) for r in runs)
    ax.set_xticks(range(episodes), [str(e + 1) for e in range(episodes)])
    ax.set_xlabel("episode")
    target = runs[0]["target"]
    ax.set_title(f"Task trained in each episode (target {target}; {target} test accuracy in brackets)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(tasks))]
    ax.legend(handles, tasks, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.figures", description=__doc__.splitlines()[0]
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        help=f"folder for the PNGs (default {LOCAL_OUT.relative_to(LOCAL_OUT.parents[1])}/, untracked)",
    )
    where.add_argument(
        "--record", action="store_true", help="write them into benchmarks/experiments/results/ beside their data"
    )
    args = parser.parse_args(argv)
    table_dir, select_dir = RESULTS / "amazon_table3", RESULTS / "select_amazon"
    out_table = table_dir if args.record else (args.out or LOCAL_OUT)
    out_select = select_dir if args.record else (args.out or LOCAL_OUT)
    for path in (table3(table_dir, out_table / "table3.png"), picks(select_dir, out_select / "picks.png")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
