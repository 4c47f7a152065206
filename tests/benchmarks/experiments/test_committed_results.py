"""The committed experiments re-render from their cells, and the benchmark suite stays free of them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.experiments import figures, mft_amazon, repro_amazon, select_amazon, typsel_amazon

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "experiments" / "results"


@pytest.mark.parametrize(
    "folder, render",
    [
        ("amazon_table3", lambda folder: repro_amazon.render(None)),
        ("mft_amazon", mft_amazon.render),
        ("select_amazon_v2", select_amazon.render),
        ("typsel", typsel_amazon.render),
    ],
)
def test_committed_tables_rerender_from_their_cells(folder, render):
    # What `python -m benchmarks.experiments.<runner> table` writes, compared with the committed TABLE.md.
    assert render(RESULTS / folder) == (RESULTS / folder / "TABLE.md").read_text()


def test_figures_of_the_committed_experiments(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert figures.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.png", "table3.png"]
    for name in ("table3.png", "picks.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and f"wrote {tmp_path / name}" in printed
    ignored = subprocess.run(["git", "check-ignore", "-q", str(figures.LOCAL_OUT / "table3.png")], cwd=figures.RESULTS)
    assert ignored.returncode == 0, "the default output folder is gitignored"


def test_the_benchmark_suite_imports_no_experiment_code():
    # `benchmarks.run --quick` imports benchmarks.run and every module it discovers; none of them may
    # pull in benchmarks.experiments (a fresh interpreter, as the command runs).
    code = (
        "import importlib, json, sys\n"
        "from benchmarks import run, plot, harness\n"
        "for name in run.discover():\n"
        "    importlib.import_module(f'benchmarks.bench_{name}')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('benchmarks'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "benchmarks.bench_pooling" in loaded, "the check itself is broken"
    assert not [m for m in loaded if m.startswith("benchmarks.experiments")], loaded
