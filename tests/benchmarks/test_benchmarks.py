"""The benchmark harness: the quick suite writes complete rows, the report renders, the baseline
computes the same loss as fastmft, and every benchmark module's quick cases still run."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import harness, plot
from benchmarks import run as bench_run
from benchmarks.harness import Case

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two OpenMP threads competing with other
    processes make tiny ops hundreds of times slower; this test checks the pipeline, not speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_mft(monkeypatch, one_thread):
    """bench_mft_step at one tiny size and 2 steps per call: the pipeline, not the numbers."""
    mod = importlib.import_module("benchmarks.bench_mft_step")
    monkeypatch.setattr(mod, "sizes", lambda scale, device: [dict(model="tiny", batch=8, max_len=32)])
    monkeypatch.setitem(mod.WINDOW, "quick", 2)
    return mod


def test_quick_run_writes_complete_rows_and_summary(tmp_path, small_mft):
    minimal = harness.Budget(warmup_s=0.0, measure_s=0.0, min_reps=3, max_reps=3)
    rows = bench_run.run("quick", only=["mft_step"], device="cpu", results_dir=tmp_path, verbose=False, budget=minimal)
    stored = [json.loads(line) for line in (tmp_path / harness.RESULTS_FILE).read_text().splitlines()]
    assert len(stored) == len(rows)
    for r in stored:
        assert tuple(r) == harness.ROW_FIELDS, "every row has exactly the documented fields, in order"
        assert r["status"] == "ok", r["error"]
        assert r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] and r["reps"] == 3
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] == torch.__version__
        assert r["python"] and r["date"] and r["scale"] == "quick"
        assert r["ceiling_gbps"] > 0 and r["ceiling_read_gbps"] > 0 and r["ceiling_tflops"] > 0
    ceilings = [r for r in stored if r["kind"] == "ceiling"]
    assert {r["op"] for r in ceilings} == {"ceiling:copy", "ceiling:read", "ceiling:matmul"}
    assert {r["size"]["phase"] for r in ceilings} == {"start", "end"}
    for op, key in (
        ("ceiling:copy", "ceiling_gbps"),
        ("ceiling:read", "ceiling_read_gbps"),
        ("ceiling:matmul", "ceiling_tflops"),
    ):
        start = max(harness.ceiling_rate(r) for r in ceilings if r["op"] == op and r["size"]["phase"] == "start")
        best = max(harness.ceiling_rate(r) for r in ceilings if r["op"] == op)
        # rows are written as they are measured: case rows carry the start's ceilings, the end's the best
        assert all(r[key] == pytest.approx(start) for r in stored if r["kind"] == "case")
        assert all(r[key] == pytest.approx(best) for r in ceilings if r["size"]["phase"] == "end")
    cases = [r for r in stored if r["kind"] == "case"]
    assert {r["provider"] for r in cases} == {"fastmft", "fastmft-maxpad", "hf-eager"}
    for r in cases:
        assert r["op"] == "mft_step" and r["items"] == 16 and r["items_per_s"] > 0
        assert r["tflops"] > 0 and r["pct_matmul"] > 0 and r["pct_ceiling"] == r["pct_matmul"]
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] > 0, r["mem_method"]
        others = {c["provider"] for c in cases} - {r["provider"]}
        assert set(r["speedup_vs"]) == others
        for p, ratio in r["speedup_vs"].items():
            other = next(c for c in cases if c["provider"] == p)
            assert ratio == pytest.approx(other["median_ms"] / r["median_ms"])

    pytest.importorskip("matplotlib")
    summary = plot.render(tmp_path)
    text = summary.read_text()
    assert plot.NOT_ON_GPU in text
    assert "### mft_step · train-fp32" in text and "hf-eager" in text
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert pngs[0].name in text


def test_plot_without_matplotlib_fails_and_writes_nothing(tmp_path, monkeypatch, capsys):
    harness.append_rows([{"kind": "ceiling", "status": "ok"}], tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot.main(["--results-dir", str(tmp_path)]) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [harness.RESULTS_FILE], "no SUMMARY.md, no plots/"


def test_plot_without_results_says_how_to_get_them(tmp_path, capsys):
    assert plot.main(["--results-dir", str(tmp_path), "--no-plots"]) == 2
    assert "benchmarks.run --quick" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_default_results_dir_is_untracked_and_record_is_explicit(monkeypatch):
    out = subprocess.run(
        ["git", "check-ignore", "-q", str(harness.LOCAL_RESULTS_DIR / harness.RESULTS_FILE)],
        cwd=harness.RESULTS_DIR,
        capture_output=True,
    )
    assert out.returncode == 0, "runs/bench/ must be gitignored"
    seen = []
    monkeypatch.setattr(
        bench_run, "run", lambda scale, only, device, results_dir, write: seen.append(results_dir) or []
    )
    assert bench_run.main(["--quick"]) == 0 and bench_run.main(["--quick", "--record"]) == 0
    assert seen == [harness.LOCAL_RESULTS_DIR, harness.RESULTS_DIR]
    with pytest.raises(SystemExit):
        bench_run.main(["--record", "--results-dir", "x"])


def test_failing_case_is_recorded_and_others_still_run():
    env = harness.environment(CPU, "quick")

    def boom():
        raise RuntimeError("kernel exploded")

    good = Case("op", "fastmft", "fwd", {"N": 4}, fn=lambda: torch.ones(4).sum(), bytes=16)
    bad = Case("op", "torch-eager", "fwd", {"N": 4}, fn=boom)
    out = bench_run.run_group([good, bad], CPU, harness.budget_for("quick", CPU), env, "run", "test", 0)
    (good_row, good_t), (bad_row, bad_t) = out
    assert good_row["status"] == "ok" and good_t.reps >= 3
    assert bad_row["status"] == "error" and "kernel exploded" in bad_row["error"] and bad_t is None
    harness.fill_rates(good_row, good_t, {"copy_gbps": 10.0})
    assert good_row["gbps"] == pytest.approx(16 / (good_t.median_ms / 1e3) / 1e9)
    assert good_row["pct_copy_bw"] == pytest.approx(100 * good_row["gbps"] / 10.0)


def test_setup_runs_untimed_before_every_repetition():
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1

    def fn():
        assert calls["setup"] == calls["fn"] + 1, "setup must precede every call"
        calls["fn"] += 1

    t = harness.time_case(Case("op", "p", "m", {}, fn=fn, setup=setup), CPU, harness.budget_for("quick", CPU))
    assert t.reps >= 3 and calls["setup"] == calls["fn"]


def test_rotating_cycles_through_copies():
    seen = []
    call = harness.rotating([0, 1, 2], seen.append)
    for _ in range(7):
        call()
    assert seen == [0, 1, 2, 0, 1, 2, 0] and call.copies == 3
    n = harness.copies_needed(1 << 10, CPU)
    assert 2 <= n <= 32
    assert harness.copies_needed(1 << 30, CPU) == 1


def test_peak_memory_counts_temporaries_on_cpu():
    x = torch.randn(256, 256)

    def fn():
        y = x @ x  # 256 KiB temporary
        z = y + 1  # 256 KiB result, y still alive
        del y
        return z

    peak, method = harness.peak_memory(Case("op", "p", "m", {}, fn=fn), CPU)
    assert peak is not None, method
    assert peak >= 2 * 256 * 256 * 4


def test_goal_status_reads_gpu_rows():
    assert all(s == plot.NOT_ON_GPU for _, s, _ in plot.goal_status([]))
    row = dict.fromkeys(harness.ROW_FIELDS)
    row.update(
        device="cuda",
        kind="case",
        status="ok",
        op="masked_mean_pool",
        mode="fwd",
        provider="fastmft-triton",
        size={"L": 3, "B": 256, "T": 512, "D": 768, "dtype": "bfloat16"},
        size_label="L=3 B=256 T=512 D=768 dtype=bf16",
        pct_copy_bw=90.0,
        speedup_vs={"torch-eager": 2.5, "torch-compile": 1.2},
    )
    status = dict((g, s) for g, s, _ in plot.goal_status([row]))
    assert status[plot.GPU_GOALS[0]["name"]] == "met"
    row["pct_copy_bw"] = 70.0
    status = dict((g, s) for g, s, _ in plot.goal_status([row]))
    assert status[plot.GPU_GOALS[0]["name"]] == "NOT met"
    assert status[plot.GPU_GOALS[1]["name"]] == "no matching GPU row"
    ce = dict(
        row,
        op="multi_head_cross_entropy",
        mode="fwd+bwd",
        size={"N": 128, "heads": 4, "dtype": "bfloat16"},
        size_label="N=128 heads=4 dtype=bfloat16",
        speedup_vs={"torch-eager": 3.4},
        device_launches=3,
    )
    goal = next(g for g in plot.GPU_GOALS if "MFT-sized" in g["name"])
    ((status, evidence),) = [(s, e) for g, s, e in plot.goal_status([ce]) if g == goal["name"]]
    assert status == "met" and "3.40x vs torch-eager" in evidence and "3 device launches" in evidence


def test_hf_baseline_computes_the_same_loss_as_fastmft():
    """The end-to-end comparison is only fair if both providers compute the same loss; dynamic
    padding (fastmft) and max-length padding (baseline) must agree too."""
    from transformers import BertConfig, BertModel

    import fastmft
    from benchmarks.baselines.hf_mft import HFMFTLoss, pad_batch
    from benchmarks.bench_mft_step import MODELS, make_batches

    cfg = MODELS["tiny"]
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False
    ).eval()
    layers = fastmft.skip_layers(cfg["num_hidden_layers"])
    ours = fastmft.MFTLoss(cfg["hidden_size"], 3, 4, layers=layers)
    base = HFMFTLoss(cfg["hidden_size"], 3, 4, layers=layers)
    base.load_state_dict(ours.state_dict())
    (bt,) = make_batches(dict(batch=8, max_len=32), cfg, window=1)
    extra = dict(typicality=bt["typicality"], corrupted=bt["corrupted"])
    ids, mask = pad_batch(bt["ids"], bt["lengths"], 32)
    hs = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    expected = ours(hs, mask, bt["labels"], bt["domains"], **extra)
    loss, label_loss, domain_loss = base(hs, mask, bt["labels"], bt["domains"], **extra)
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(label_loss, expected.label_loss)
    torch.testing.assert_close(domain_loss, expected.domain_loss)
    short = int(bt["lengths"].max())
    ids_s, mask_s = pad_batch(bt["ids"], bt["lengths"], short)
    hs_s = encoder(input_ids=ids_s, attention_mask=mask_s, output_hidden_states=True).hidden_states
    trimmed = ours(hs_s, mask_s, bt["labels"], bt["domains"], **extra)
    torch.testing.assert_close(trimmed.loss, expected.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in bench_run.discover() if n != "mft_step"])
def test_every_benchmark_module_quick_cases_run(name, one_thread):
    """Each module's quick cases build and run once on CPU (torch.compile providers excepted here
    for time: `python -m benchmarks.run --quick` runs them; mft_step runs in full above)."""
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    for case in harness.flat_cases(mod.cases("quick", CPU)):
        assert isinstance(case, Case)
        assert case.op and case.provider and case.mode and isinstance(case.size, dict)
        assert case.bytes >= 0 and case.flops >= 0
        if "compile" in case.provider:
            continue
        if case.setup is not None:
            case.setup()
        case.fn()


def test_score_section_keeps_the_newest_row_per_provider_and_relates_them(tmp_path):
    def row(provider, rows_per_s, date, note):
        return {
            "provider": provider,
            "rows": 100,
            "wall_s": 100 / rows_per_s,
            "rows_per_s": rows_per_s,
            "peak_rss_bytes": 300 << 20,
            "data": "d.jsonl[:100]",
            "model": "tiny",
            "max_length": 64,
            "batch_size": 8,
            "device": "cpu",
            "threads": 1,
            "date": date,
            "note": note,
        }

    rows = [
        row("fastmft-score", 40.0, "2026-01-01T00:00", "first"),
        row("peer", 10.0, "2026-01-01T00:01", "first"),
        row("naive", 8.0, "2026-01-01T00:02", "first"),
        row("peer", 20.0, "2026-01-01T00:03", "peer rerun"),
    ]
    path = tmp_path / "score.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = "\n".join(plot.score_section(path))
    ours = next(line for line in text.splitlines() if line.startswith("| fastmft-score |"))
    assert "| 5.00x | 2.00x |" in ours  # 40/8 against naive, 40/20 against the newest peer row
    assert "- first" in text and "- peer rerun" in text
    assert plot.score_section(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize(
    "name, small_sizes",
    [
        ("pooling", [dict(L=2, B=2, T=5, D=8, dtype="float32"), dict(L=2, B=3, T=7, D=8, dtype="float32")]),
        ("cross_entropy", [dict(N=5, heads=4, dtype="float32"), dict(N=9, heads=4, dtype="float32")]),
        ("typicality", [dict(N=6, D=8, K=3, M=2, dtype="float32"), dict(N=11, D=8, K=3, M=2, dtype="float32")]),
    ],
)
def test_cases_of_several_sizes_each_run_their_own_inputs(name, small_sizes, monkeypatch, one_thread):
    """Every case binds its own size's inputs, even when all are collected before any runs (a case
    that late-binds a loop variable ran the next size's inputs on a GPU: a [256, 512] pooling case
    got a [32, 128] mask)."""
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    monkeypatch.setattr(mod, "sizes", lambda scale, device: small_sizes)
    cases = harness.flat_cases(mod.cases("full", torch.device("cpu")))
    assert cases
    for case in cases:
        if case.setup:
            case.setup()
        case.fn()  # raises on a shape mismatch when inputs of two sizes meet
        rows = case.size.get("B", case.size.get("N"))
        out = case.fn()
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and name != "cross_entropy":
            assert rows in out.shape, (case.op, case.provider, case.size, tuple(out.shape))
