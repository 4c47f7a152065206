"""The MFT experiment's cells, groups and probe difference."""

import numpy as np

from benchmarks.experiments.mft_amazon import Cell, _probe_difference, expand


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
