"""The command line on small data and a tiny local backbone."""

import json

import pytest
import torch

from fastmft.cli import main
from fastmft.data.synthetic import synthetic_corpus
from tests.helpers import tiny_bert


def test_demo_data_then_typicality(tmp_path, capsys):
    data = tmp_path / "demo.jsonl"
    assert main(["demo-data", str(data), "--per-domain", "8", "--domains", "2"]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert rows == synthetic_corpus(8, domains=2)
    words = " ".join(r["text"] for r in rows).replace(".", " ").replace(",", " ").split()
    folder = tiny_bert(tmp_path / "bert", words)
    out = tmp_path / "scores.jsonl"
    code = main(
        [
            "typicality",
            "--data",
            str(data),
            "--backbone",
            str(folder),
            "--id-column",
            "id",
            "--top",
            "2",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "== domain books: 8 rows" in printed and printed.count("most typical") == 2
    from fastmft.runtime.precision import default_precision

    ran = default_precision(torch.device("cpu"))  # the CPU's default: no --precision given
    assert f"on cpu, {ran} encoder (pooling, prototypes and typicality in fp32)" in printed
    shown = [line for line in printed.splitlines() if line.startswith("    +") or line.startswith("    -")]
    assert len(shown) == 2 * 2 * 2, "2 domains x 2 ends x --top 2"
    for line in shown:
        text = line.split("] ", 1)[1].rsplit("  (", 1)[0]
        assert len(text) <= 80 and any(text.rstrip(" …") in r["text"] for r in rows), "the row's text, shortened"
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in rows]
    assert all(-1 <= s["typicality"] <= 1 for s in scores)


def test_bad_column_is_a_clean_error(tmp_path, capsys):
    data = tmp_path / "demo.jsonl"
    main(["demo-data", str(data), "--per-domain", "4", "--domains", "1"])
    folder = tiny_bert(tmp_path / "bert", ["x"])
    assert main(["typicality", "--data", str(data), "--backbone", str(folder), "--label-column", "stars"]) == 2
    assert "no column 'stars'" in capsys.readouterr().err


@pytest.fixture
def library_bars_restored():
    """quiet_libraries() is process-wide: give later tests their default bars back."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    yield
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()


@pytest.mark.parametrize("no_progress", [False, True])
def test_only_fastmft_bars_are_shown(tmp_path, capfd, library_bars_restored, no_progress):
    data = tmp_path / "demo.jsonl"
    main(["demo-data", str(data), "--per-domain", "8", "--domains", "2"])
    words = " ".join(json.loads(line)["text"] for line in data.read_text().splitlines()).replace(".", " ").split()
    folder = tiny_bert(tmp_path / "bert", words)
    capfd.readouterr()
    argv = ["typicality", "--data", str(data), "--split", "train", "--backbone", str(folder), "--top", "1"]
    assert main(argv + (["--no-progress"] if no_progress else [])) == 0
    err = capfd.readouterr().err
    for library_bar in ("Loading weights", "Filter", "Map", "tokenising", "Flattening"):
        assert library_bar not in err
    assert ("embedding" in err) is not no_progress, err


def test_shorten_cuts_at_a_word_with_an_ellipsis():
    from fastmft.pipelines.typicality.report import shorten

    assert shorten("short text") == "short text"
    long = "word " * 40
    assert shorten(long, 30) == "word word word word word …" and len(shorten(long)) <= 80


def test_typicality_and_train_use_the_same_synthetic_corpus():
    from fastmft.cli import build_parser

    typicality = build_parser("typicality").parse_args(["typicality"])
    assert typicality.synthetic_per_domain == build_parser("train").parse_args(["train"]).synthetic_per_domain
