"""The statistics of the experiments: paired intervals and tests over per-row correctness.

One module for every runner (and the tests), so that an interval in one table means what it
means in the others.
"""

from __future__ import annotations

import math
import statistics


def bootstrap(matrix, *, blocks: int, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``matrix`` [seeds, rows] and its two-level bootstrap 95 % percentile interval:
    seeds resampled with replacement, then rows resampled within each of ``blocks`` equal blocks
    (the domains; 1 when the rows are one domain's)."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    s_n, n = m.shape
    rng = np.random.default_rng(seed)
    block = n // blocks
    stats = np.empty(resamples)
    for start in range(0, resamples, 500):
        b = min(500, resamples - start)
        si = rng.integers(0, s_n, (b, s_n))
        ri = np.concatenate([k * block + rng.integers(0, block, (b, block)) for k in range(blocks)], 1)
        stats[start : start + b] = m[si[:, :, None], ri[:, None, :]].mean((1, 2))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(m.mean()), float(lo), float(hi)


def mcnemar(a, b) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired 0/1 correctness: (a right b wrong, b right a wrong, p)."""
    n01 = int(((a == 1) & (b == 0)).sum())
    n10 = int(((a == 0) & (b == 1)).sum())
    n = n01 + n10
    if n == 0:
        return n01, n10, 1.0
    k = min(n01, n10)
    p = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return n01, n10, min(1.0, p)


def mean_std(values: list[float], digits: int = 1) -> str:
    """``mean ± sample std`` (the mean alone for one value)."""
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread}"
