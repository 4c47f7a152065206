"""--plot of ``fastmft typicality`` and ``fastmft score``: a PNG of the typicality per domain, and
without matplotlib a clear error before any scoring."""

import json
import sys

import pytest

from fastmft.cli import main
from fastmft.pipelines.plots import typicality_histogram
from tests.helpers import tiny_bert

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    data = root / "demo.jsonl"
    main(["demo-data", str(data), "--per-domain", "8", "--domains", "2"])
    words = (
        " ".join(json.loads(line)["text"] for line in data.read_text().splitlines())
        .replace(".", " ")
        .replace(",", " ")
        .split()
    )
    return data, tiny_bert(root / "bert", words)


def test_typicality_plot(demo, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, bert = demo
    png = tmp_path / "figs" / "typicality.png"
    assert main(["typicality", "--data", str(data), "--backbone", str(bert), "--no-progress", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert f"wrote the typicality per domain to {png}" in capsys.readouterr().out


def test_score_plot(demo, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, bert = demo
    png = tmp_path / "score.png"
    out = tmp_path / "scores.parquet"
    assert (
        main(
            [
                "score",
                str(data),
                "-o",
                str(out),
                "--backbone",
                str(bert),
                "--max-length",
                "32",
                "--threads",
                "1",
                "--no-progress",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert f"plot: {png}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["typicality", "score"])
def test_missing_matplotlib_is_a_clear_error_before_scoring(demo, tmp_path, capsys, monkeypatch, command):
    data, bert = demo
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    argv = (
        ["typicality", "--data", str(data), "--output", str(out)]
        if command == "typicality"
        else ["score", str(data), "-o", str(out)]
    )
    assert main(argv + ["--backbone", str(bert), "--no-progress", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing was scored or written"


def test_histogram_checks_its_inputs(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="3 scores but 2 domains"):
        typicality_histogram([0.1, 0.2, 0.3], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no scores"):
        typicality_histogram([], [], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
