"""The experiments' statistics (benchmarks.experiments.stats): exact McNemar and the two-level
bootstrap, against direct computations."""

import math

import numpy as np

from benchmarks.experiments.stats import bootstrap, mcnemar, mean_std


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
    mean, lo, hi = bootstrap(m, blocks=4, resamples=2000)
    assert math.isclose(mean, m.mean()) and lo < mean < hi and hi - lo < 0.1
    assert bootstrap(np.full((3, 8), 0.25), blocks=4, resamples=200) == (0.25, 0.25, 0.25)
    # seed-level noise widens the interval beyond row noise alone
    shifted = m + np.array([[-0.2], [-0.1], [0.0], [0.1], [0.2]])
    assert bootstrap(shifted, blocks=4, resamples=2000)[2] - bootstrap(shifted, blocks=4, resamples=2000)[1] > hi - lo


def test_one_block_bootstrap():
    rng = np.random.default_rng()
    m = (rng.random((4, 200)) < 0.85).astype(float) - (rng.random((4, 200)) < 0.8).astype(float)
    mean, lo, hi = bootstrap(m, blocks=1, resamples=2000)
    assert math.isclose(mean, m.mean()) and lo < mean < hi
    assert bootstrap(np.full((2, 7), -0.5), blocks=1, resamples=100) == (-0.5, -0.5, -0.5)


def test_mean_std_is_the_sample_standard_deviation():
    rng = np.random.default_rng()
    xs = rng.normal(0.8, 0.05, 5).tolist()
    assert mean_std(xs, 3) == f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}"
    assert mean_std([0.25], 2) == "0.25"
