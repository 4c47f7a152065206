"""The typicality-selection experiment: which rows each arm trains on, and the table its cells render."""

import json

import numpy as np
import pytest

from benchmarks.experiments.typsel_amazon import REGISTERED, Cell, expand, render, select_rows
from benchmarks.mft_amazon import DOMAINS


def _data(rng, sizes):
    """Labels, domains and float32 typicality, cells of the given sizes interleaved at random; a
    third of the scores rounded to one decimal, so that ties occur."""
    labels, domains = [], []
    for (k, y), n in sizes.items():
        labels += [y] * n
        domains += [k] * n
    order = rng.permutation(len(labels))
    labels, domains = [labels[i] for i in order], [domains[i] for i in order]
    t = rng.normal(0.3, 0.2, len(labels)).astype(np.float32)
    tied = rng.random(len(t)) < 1 / 3
    t[tied] = np.round(t[tied], 1)
    return labels, domains, t


def _reference(arm, t, labels, domains, fraction=0.5):
    """Per (domain, label) cell: rank by t descending then position (float64 lexsort), keep the first
    or last round-half-to-even(n * fraction) rows."""
    labels, domains, t = np.asarray(labels), np.asarray(domains), np.asarray(t, dtype=np.float64)
    keep = []
    for k, y in {(int(a), int(b)) for a, b in zip(domains, labels)}:
        rows = np.flatnonzero((domains == k) & (labels == y))
        ranked = rows[np.lexsort((rows, -t[rows]))]
        n = max(1, int(np.round(len(rows) * fraction)))
        keep += list(ranked[:n] if arm == "top" else ranked[-n:])
    return sorted(int(i) for i in keep)


def test_top_and_bottom_halves_against_reference():
    rng = np.random.default_rng()
    sizes = {(k, y): int(rng.integers(1, 40)) for k in range(3) for y in range(2)}
    sizes[(0, 0)], sizes[(1, 1)] = 1, 2  # a single row kept as max(1, ...); a 2-row cell split 1 / 1
    labels, domains, t = _data(rng, sizes)
    top, bottom = select_rows("top", t, labels, domains, 0), select_rows("bottom", t, labels, domains, 0)
    assert top == _reference("top", t, labels, domains) and bottom == _reference("bottom", t, labels, domains)
    for (k, y), n in sizes.items():
        cell = {i for i in range(len(labels)) if labels[i] == y and domains[i] == k}
        kept_top, kept_bottom = cell & set(top), cell & set(bottom)
        assert len(kept_top) == len(kept_bottom) == max(1, round(n / 2))
        rest = cell - kept_top
        assert not rest or min(t[i] for i in kept_top) >= max(t[i] for i in rest)
        rest = cell - kept_bottom
        assert not rest or max(t[i] for i in kept_bottom) <= min(t[i] for i in rest)
        if n % 2 == 0:  # one ranking: the two halves split an even cell
            assert kept_top | kept_bottom == cell and not kept_top & kept_bottom
    assert select_rows("all", t, labels, domains, 3) == list(range(len(labels)))
    with pytest.raises(ValueError, match="unknown arm"):
        select_rows("middle", t, labels, domains, 0)


def test_random_half_is_stratified_seeded_and_paired_in_size():
    rng = np.random.default_rng()
    sizes = {(k, y): int(rng.integers(20, 60)) for k in range(4) for y in range(2)}
    labels, domains, t = _data(rng, sizes)
    draws = [select_rows("random", t, labels, domains, s) for s in (0, 1, 0)]
    assert draws[0] == draws[2] and draws[0] != draws[1]
    top = select_rows("top", t, labels, domains, 0)
    for rows in draws:
        assert rows == sorted(set(rows))
        for k, y in sizes:  # the same number of rows per cell as the typicality arms
            assert sum(labels[i] == y and domains[i] == k for i in rows) == sum(
                labels[i] == y and domains[i] == k for i in top
            )
    # the draw ignores t: the kept rows' ranks within their cell spread over the whole range
    order = np.lexsort((np.arange(len(t)), -t.astype(np.float64)))
    rank = np.empty(len(t))
    for k, y in sizes:
        cell = [i for i in order if labels[i] == y and domains[i] == k]
        rank[cell] = np.arange(len(cell)) / (len(cell) - 1)
    assert 0.35 < rank[draws[0]].mean() < 0.65


def test_protocol_row_and_update_counts():
    """The protocol's numbers: 3,128 of the 6,253 training rows, and 398 updates in every half arm
    (98 pooled, 25 per domain and epoch) whatever the rows' lengths."""
    from fastmft.data import LengthBucketSampler

    counts = {"books": (763, 793), "dvd": (759, 795), "electronics": (779, 787), "kitchen": (781, 796)}
    sizes = {(k, y): counts[d][y] for k, d in enumerate(DOMAINS) for y in (0, 1)}
    rng = np.random.default_rng()
    labels, domains, t = _data(rng, sizes)
    lengths = rng.integers(5, 129, len(labels))

    def updates(rows):
        def batches(subset):
            return len(list(LengthBucketSampler(lengths[subset].tolist(), 32, seed=int(rng.integers(1000)))))

        per_domain = [batches([i for i in rows if domains[i] == k]) for k in range(4)]
        return batches(rows) + 3 * sum(per_domain), per_domain

    full = updates(list(range(len(labels))))[0]
    assert full == 787  # the committed all-rows cells' step count
    for arm in ("top", "random", "bottom"):
        rows = select_rows(arm, t, labels, domains, 2)
        assert len(rows) == 3128
        assert updates(rows) == (398, [25, 25, 25, 25])


def test_cells_and_order():
    assert Cell.parse("random_seed3") == Cell("random", 3) and Cell("top", 0).name == "top_seed0"
    names = [c.name for c in REGISTERED]
    assert names[:6] == ["top_seed0", "random_seed0", "bottom_seed0", "top_seed1", "random_seed1", "bottom_seed1"]
    assert len(names) == len(set(names)) == 16 and names[-1] == "all_seed0"
    assert expand("bottom_seed4,registered")[0] == Cell("bottom", 4) and len(expand("registered,top_seed0")) == 16
    with pytest.raises(ValueError, match="unknown cell"):
        Cell.parse("mixft_seed0")


def _cell(arm, seed, gold, pred, **extra):
    split = {
        d: {"accuracy": float(np.mean(np.equal(p, g))), "gold": g.tolist(), "pred": p.tolist()}
        for d, g, p in zip(DOMAINS, gold, pred)
    }
    return {
        "cell": f"{arm}_seed{seed}",
        "arm": arm,
        "seed": seed,
        "test": split,
        "dev": split,
        "wall_time_s": 60.0,
        "device_name": "test CPU",
        "data": {"sha256": {"books.jsonl": "x"}},
        "hyper_parameters": {"lr": 5e-5},
        **extra,
    }


def test_table_from_synthetic_cells(tmp_path):
    rng = np.random.default_rng()
    n = 30  # test rows per domain
    gold = rng.integers(0, 2, (len(DOMAINS), n))
    acc = {"top": 0.8, "random": 0.7, "bottom": 0.6, "mixft": 0.85}
    preds = {(arm, s): np.where(rng.random(gold.shape) < p, gold, 1 - gold) for arm, p in acc.items() for s in range(3)}
    results, reference = tmp_path / "typsel", tmp_path / "mft"
    for (arm, s), pred in preds.items():
        if (arm, s) == ("bottom", 2):
            continue  # unfinished: bottom has 2 of 5 seeds
        folder = (reference if arm == "mixft" else results) / "cpu"
        folder.mkdir(parents=True, exist_ok=True)
        extra = (
            {}
            if arm == "mixft"
            else {"selection": {"mean_typicality": 0.1, "mean_tokens": 100, "overlap_with_top": 0.5}}
        )
        (folder / f"{arm}_seed{s}.json").write_text(json.dumps(_cell(arm, s, gold, pred, **extra)))
    decoy = np.where(
        rng.random(gold.shape) < 0.5, gold, 1 - gold
    )  # other arms of the MFT experiment: not the reference
    for name in ("mix_seed0", "mixft_fs5_seed1"):
        (reference / "cpu" / f"{name}.json").write_text(json.dumps(_cell(name.split("_")[0], 0, gold, decoy)))
    text = render(results, reference)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    for line in text.splitlines():  # every table row has as many columns as its header
        if line.startswith("| arm |") or line.startswith("| comparison |"):
            width = line.count("|")
        elif line.startswith("|"):
            assert line.count("|") == width, line

    def check(label, a, b, seeds):
        cols = [c.strip() for c in rows[label].strip("|").split("|")]
        ca = np.stack([(preds[a, s] == gold).ravel() for s in seeds]).astype(np.float64)
        cb = np.stack([(preds[b, s] == gold).ravel() for s in seeds]).astype(np.float64)
        assert cols[1].startswith(f"**{100 * (ca - cb).mean():+.1f}**") and cols[2] == f"{len(seeds)}/5"
        for k, d in enumerate(DOMAINS):  # McNemar's discordant rows, summed over seeds
            sl = slice(k * n, (k + 1) * n)
            a_only, b_only = (
                int(((ca[:, sl] == 1) & (cb[:, sl] == 0)).sum()),
                int(((ca[:, sl] == 0) & (cb[:, sl] == 1)).sum()),
            )
            assert f"{d} {100 * (ca[:, sl] - cb[:, sl]).mean():+.1f} ({a_only}/{b_only}, p " in cols[4]

    check("**primary: top − random**", "top", "random", [0, 1, 2])
    check("bottom − random", "bottom", "random", [0, 1])
    check("all rows − top (reference from an earlier commit, not yet checked)", "mixft", "top", [0, 1, 2])
    assert "`all_seed0` (the reference's seed 0 rerun at this experiment's commit): pending." in text
    random_row = [line for line in text.splitlines() if line.startswith("| random half |")][0]
    mean = 100 * np.mean([(preds["random", s] == gold).mean() for s in range(3)])
    assert f"**{mean:.1f}** [" in random_row and "| 3/5 |" in random_row
    assert "| bottom half (least typical) |" in text and "| 2/5 |" in rows["bottom half (least typical)"]

    # the comparability check: the rerun differs from the committed seed 0 in exactly `flips` test rows
    flips = 7
    rerun = preds["mixft", 0].copy().ravel()
    rerun[rng.choice(rerun.size, flips, replace=False)] ^= 1
    (results / "cpu" / "all_seed0.json").write_text(json.dumps(_cell("all", 0, gold, rerun.reshape(gold.shape))))
    text = render(results, reference)
    assert f"{flips} of {gold.size} test and {flips} of {gold.size} dev predictions differ" in text
    assert f"all rows − top (reference from an earlier commit: {flips} test predictions differ at this one)" in text
