"""The MFT experiment's analysis: exact McNemar and the two-level bootstrap, against direct computations."""

import math

import numpy as np

from benchmarks.mft_amazon import Cell, _probe_difference, bootstrap, expand, mcnemar


def test_mcnemar_exact_against_binomial_sum():
    rng = np.random.default_rng()
    a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    n01, n10, p = mcnemar(a, b)
    assert n01 == int(((a == 1) & (b == 0)).sum()) and n10 == int(((a == 0) & (b == 1)).sum())
    n, k = n01 + n10, min(n01, n10)
    tail = sum(math.comb(n, i) * 0.5**n for i in range(k + 1))  # P(X <= k), X ~ Bin(n, 1/2)
    assert math.isclose(p, min(1.0, 2 * tail), rel_tol=1e-12)
    assert mcnemar(np.ones(5), np.zeros(5)) == (5, 0, 2 / 32)
    assert mcnemar(np.ones(5), np.ones(5))[2] == 1.0


def test_bootstrap_interval():
    rng = np.random.default_rng()
    m = (rng.random((5, 800)) < 0.9).astype(float) - (rng.random((5, 800)) < 0.88).astype(float)
    mean, lo, hi = bootstrap(m, resamples=2000)
    assert math.isclose(mean, m.mean()) and lo < mean < hi and hi - lo < 0.1
    assert bootstrap(np.full((3, 8), 0.25), resamples=200) == (0.25, 0.25, 0.25)
    # seed-level noise widens the interval beyond row noise alone
    shifted = m + np.array([[-0.2], [-0.1], [0.0], [0.1], [0.2]])
    assert bootstrap(shifted, resamples=2000)[2] - bootstrap(shifted, resamples=2000)[1] > hi - lo


def test_cells_and_groups():
    assert Cell.parse("mixft_fs5_seed3") == Cell("mixft", 3, 5) and Cell("full", 0).name == "full_seed0"
    primary = expand("primary")
    assert [c.name for c in primary[:4]] == ["full_seed0", "mixft_seed0", "full_seed1", "mixft_seed1"] and len(
        primary
    ) == 10
    assert len(expand("all")) == len(set(expand("all"))) == 10 + 45 + 15 + 5 + 6 + 15
    assert Cell.parse("full_fs5m_seed1") == Cell("full", 1, 5, True) == expand("fewshot5m")[3]


def test_probe_difference_is_lambda01_minus_lambda0_over_shared_seeds():
    rng = np.random.default_rng()
    acc = {(a, s): rng.random(3) for a in ("probe0", "probe01") for s in (0, 1, 2)}
    cells = {
        Cell(a, s).name: {"probe_dev_accuracy": {str(l): {"dev": acc[a, s][j]} for j, l in enumerate((2, 4, 6))}}
        for (a, s) in acc
        if (a, s) != ("probe01", 2)  # seed 2 unpaired: left out of the difference
    }
    (row,) = _probe_difference(cells)
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[1] == "0, 1"
    for j, col in enumerate(cols[2:]):
        diffs = [100 * (acc["probe01", s][j] - acc["probe0", s][j]) for s in (0, 1)]
        assert col == f"**{sum(diffs) / 2:+.1f}** ({diffs[0]:+.1f}, {diffs[1]:+.1f})"
    assert _probe_difference({k: v for k, v in cells.items() if "probe01" not in k}) == []
