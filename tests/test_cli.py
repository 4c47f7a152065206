"""The command line on small data and a tiny local backbone."""
import json

from fastmft.cli import main
from fastmft.synthetic import synthetic_corpus
from tests.helpers import tiny_bert


def test_demo_data_then_typicality(tmp_path, capsys):
    data = tmp_path / "demo.jsonl"
    assert main(["demo-data", str(data), "--per-domain", "8", "--domains", "2"]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert rows == synthetic_corpus(8, domains=2)
    words = " ".join(r["text"] for r in rows).replace(".", " ").replace(",", " ").split()
    folder = tiny_bert(tmp_path / "bert", words)
    out = tmp_path / "scores.jsonl"
    code = main(["typicality", "--data", str(data), "--backbone", str(folder), "--id-column", "id",
                 "--top", "2", "--output", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "== domain books: 8 rows" in printed and printed.count("most typical") == 2
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in rows]
    assert all(-1 <= s["typicality"] <= 1 for s in scores)


def test_bad_column_is_a_clean_error(tmp_path, capsys):
    data = tmp_path / "demo.jsonl"
    main(["demo-data", str(data), "--per-domain", "4", "--domains", "1"])
    folder = tiny_bert(tmp_path / "bert", ["x"])
    assert main(["typicality", "--data", str(data), "--backbone", str(folder), "--label-column", "stars"]) == 2
    assert "no column 'stars'" in capsys.readouterr().err
