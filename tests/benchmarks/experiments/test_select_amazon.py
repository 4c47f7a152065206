"""The selection experiment's analysis: few-shot draw and the utility's signal and noise, against
direct computations."""

import math
import random

import numpy as np

from benchmarks.experiments.select_amazon import signal_noise
from fastmft.pipelines.trainer.inputs import few_shot_rows


def test_few_shot_draw_is_the_one_the_committed_cells_used():
    # The runner drew the kitchen few-shot rows with its own copy of this draw before it used the
    # trainer's few_shot_rows over one domain; the two must pick the same rows, or the committed
    # cells could not be rerun. The reference below is that copy, restated.
    def reference(labels, fraction, seed):
        rng, keep = random.Random(seed), []
        for y in sorted(set(labels)):
            rows = [i for i, v in enumerate(labels) if v == y]
            keep += rng.sample(rows, max(1, round(fraction * len(rows))))
        return sorted(keep)

    rng = np.random.default_rng()
    labels = rng.integers(0, 3, 500).tolist()
    for fraction, seed in ((0.1, 7), (0.05, 0), (0.2, 4)):
        rows = few_shot_rows(labels, [0] * len(labels), fraction, seed)
        assert rows == reference(labels, fraction, seed)
        for y in range(3):
            assert sum(labels[i] == y for i in rows) == max(1, round(fraction * labels.count(y)))
    assert few_shot_rows(labels, [0] * 500, 0.1, 7) != few_shot_rows(labels, [0] * 500, 0.1, 8)


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
