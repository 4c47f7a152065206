"""Pictures for the commands (``--plot PATH``): the typicality distribution per domain.

matplotlib is optional: :func:`require_matplotlib` raises :class:`MissingMatplotlib` with the
install command, and the commands call it before any long work, so a missing package costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class MissingMatplotlib(RuntimeError):
    """A plot was asked for but matplotlib is not installed."""


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or MissingMatplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib(
            "`plot` needs matplotlib, which is not installed: `.venv/bin/pip install matplotlib` (or drop `plot`)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | Path) -> Path:
    """Before any work: ``--plot`` names a file that can be written (not a folder, its folder
    writable), and matplotlib is installed. Returns the path."""
    from fastmft.runtime.files import check_writable

    require_matplotlib()
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"`plot` {path} is a folder; give a file name such as {path / 'typicality.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"`plot` {path}: {parent} is a file, not a folder")
    check_writable(parent, f"`plot` {path}: the folder")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kinds = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in kinds:
        raise ValueError(f"`plot` {path}: matplotlib cannot write {path.suffix} files ({', '.join(sorted(kinds))})")
    return path


def typicality_histogram(scores: Sequence[float], domains: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One step histogram of the typicality per domain, on shared bins; returns the PNG's path."""
    import numpy as np

    plt = require_matplotlib()
    scores, domains = np.asarray(scores, dtype=np.float64), np.asarray(domains, dtype=object)
    if len(scores) != len(domains):
        raise ValueError(f"{len(scores)} scores but {len(domains)} domains")
    if not len(scores):
        raise ValueError("no scores to plot")
    bins = np.linspace(scores.min(), scores.max() + 1e-9, 31)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(domains.tolist()):
        mine = scores[domains == name]
        ax.hist(
            mine, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (n={len(mine)}, mean {mine.mean():+.3f})"
        )
    ax.set_xlabel("typicality")
    ax.set_ylabel("rows")
    ax.set_title(title or "typicality per domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format=path.suffix[1:].lower() or "png")  # the exact name, suffix or not
    plt.close(fig)
    return path


def score_output_histogram(scores_parquet: str | Path, path: str | Path) -> Path:
    """:func:`typicality_histogram` of a ``fastmft score`` output (its domain and typicality columns)."""
    import pyarrow.parquet as pq

    table = pq.read_table(scores_parquet, columns=["domain", "typicality"])
    return typicality_histogram(
        table["typicality"].to_pylist(),
        [str(d) for d in table["domain"].to_pylist()],
        path,
        title=f"typicality per domain: {Path(scores_parquet).name}",
    )
