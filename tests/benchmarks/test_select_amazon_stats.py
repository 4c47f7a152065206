"""The selection experiment's analysis: few-shot draw, the utility's signal and noise, and the
one-block bootstrap, against direct numpy computations."""

import math

import numpy as np

from benchmarks.mft_amazon import bootstrap
from benchmarks.select_amazon import _few_shot, signal_noise


def test_few_shot_is_stratified_and_seeded():
    rng = np.random.default_rng()
    labels = rng.integers(0, 3, 500).tolist()
    rows = _few_shot(labels, 0.1, seed=7)
    assert rows == sorted(set(rows)) and rows == _few_shot(labels, 0.1, seed=7) != _few_shot(labels, 0.1, seed=8)
    for y in range(3):
        assert sum(labels[i] == y for i in rows) == max(1, round(0.1 * labels.count(y)))


def test_signal_noise_against_numpy():
    rng = np.random.default_rng()
    episodes = [{"batch_scores": {s: rng.normal(k, 1.0, 6).tolist() for k, s in enumerate("abcd")}} for _ in range(5)]
    signal, noise = [], []
    for e in episodes:
        scores = np.array(list(e["batch_scores"].values()))  # [sources, M]
        signal.append(scores.mean(1).std(ddof=1))
        noise.append(math.sqrt((scores.var(1, ddof=1) / scores.shape[1]).mean()))
    got = signal_noise({"episodes": [*episodes, {"batch_scores": None}]})  # unscored episodes are skipped
    assert np.allclose(got, (np.median(signal), np.median(noise)), rtol=1e-12)
    assert signal_noise({"episodes": [{"chosen": "a"}]}) is None


def test_one_block_bootstrap():
    rng = np.random.default_rng()
    m = (rng.random((4, 200)) < 0.85).astype(float) - (rng.random((4, 200)) < 0.8).astype(float)
    mean, lo, hi = bootstrap(m, blocks=1, resamples=2000)
    assert math.isclose(mean, m.mean()) and lo < mean < hi
    assert bootstrap(np.full((2, 7), -0.5), blocks=1, resamples=100) == (-0.5, -0.5, -0.5)
