"""The benchmark data a GPU run produces is kept and labelled right (issue 27): rows written group by
group, each group timed before its module builds the next one, L2 flushed by a read, a read-only
ceiling, the small-op fields, the hash of the uncommitted diff, the committed rows' marks, and the
GPU script's control flow (run here with a CPU stand-in for python)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from benchmarks import run as bench_run
from benchmarks.harness import Case

CPU = torch.device("cpu")
MINIMAL = harness.Budget(warmup_s=0.0, measure_s=0.0, min_reps=3, max_reps=3)
ROOT = Path(__file__).resolve().parents[2]
GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu"


@pytest.fixture
def standin_module(monkeypatch):
    """Install ``benchmarks.bench_standin`` with the given ``cases`` function; tiny ceilings."""

    def install(cases):
        module = types.ModuleType("benchmarks.bench_standin")
        module.cases = cases
        monkeypatch.setitem(sys.modules, "benchmarks.bench_standin", module)
        monkeypatch.setattr(bench_run, "discover", lambda: ["standin"])
        small = torch.ones(1024)
        monkeypatch.setattr(
            harness,
            "ceiling_cases",
            lambda scale, device: [
                ("copy", Case("ceiling:copy", "torch", "memcpy", {}, lambda: small.clone(), bytes=8192)),
                ("read", Case("ceiling:read", "torch", "sum", {}, lambda: small.sum(), bytes=4096)),
                (
                    "matmul",
                    Case("ceiling:matmul", "torch", "mm", {}, lambda: small[:32, None] @ small[None, :32], flops=1),
                ),
            ],
        )

    return install


def _stored(path: Path) -> list[dict]:
    file = path / harness.RESULTS_FILE
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def test_a_case_is_timed_before_its_module_builds_the_next_size(tmp_path, standin_module):
    """On the H200 the last case of each size ran the next size's tensors: the runner asked the module
    for the next case (which rebuilt the shared inputs) before timing the group in hand."""
    inputs = {}
    seen: dict[str, set] = {}

    def cases(scale, device):
        for n in (3, 5):
            inputs["x"] = torch.ones(n)  # rebound for every size, as a module's loop variables are

            def fn(n=n):
                seen.setdefault(f"bare N={n}", set()).add(inputs["x"].numel())

            yield Case("op", "p", "fwd", {"N": n, "kind": "bare"}, fn)
        for n in (7, 11):
            inputs["y"] = torch.ones(n)

            def fn2(n=n):
                seen.setdefault(f"group N={n}", set()).add(inputs["y"].numel())

            yield [Case("op", p, "fwd", {"N": n, "kind": "group"}, fn2) for p in ("a", "b")]

    standin_module(cases)
    rows = bench_run.run("quick", device="cpu", results_dir=tmp_path, verbose=False, budget=MINIMAL)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert seen == {"bare N=3": {3}, "bare N=5": {5}, "group N=7": {7}, "group N=11": {11}}


def test_rows_are_on_disk_after_every_group(tmp_path, standin_module):
    """A run stopped in its second group (a time limit, a crash) keeps the ceilings and the first
    group: the CE rows of the H200 run were lost when its module timed out."""

    def stop():
        raise SystemExit("killed by the stage's time limit")

    def cases(scale, device):
        yield [Case("op", p, "fwd", {"N": 1}, lambda: torch.ones(4).sum(), bytes=16) for p in ("a", "b")]
        yield [Case("op", "a", "fwd", {"N": 2}, stop)]

    standin_module(cases)
    with pytest.raises(SystemExit):
        bench_run.run("quick", device="cpu", results_dir=tmp_path, verbose=False, budget=MINIMAL)
    stored = _stored(tmp_path)
    assert [r["op"] for r in stored if r["kind"] == "ceiling"] == ["ceiling:copy", "ceiling:read", "ceiling:matmul"]
    cases_done = [r for r in stored if r["kind"] == "case"]
    assert [(r["provider"], r["size"]) for r in cases_done] == [("a", {"N": 1}), ("b", {"N": 1})]
    for r in cases_done:
        assert tuple(r) == harness.ROW_FIELDS and r["status"] == "ok" and r["median_ms"] > 0
        assert r["gbps"] == pytest.approx(16 / (r["median_ms"] / 1e3) / 1e9)
        other = "b" if r["provider"] == "a" else "a"
        partner = next(c for c in cases_done if c["provider"] == other)
        assert r["speedup_vs"] == {other: pytest.approx(partner["median_ms"] / r["median_ms"])}


def test_l2_flush_reads_and_writes_nothing():
    """zero_() left dirty lines whose write-back landed in the next timed call; the flush reads."""
    buffer = torch.randn(4096, dtype=torch.float32)
    before, version = buffer.clone(), buffer._version
    sink = torch.zeros(())
    harness.l2_flush(buffer, sink)
    assert buffer._version == version, "the flush wrote to its buffer"
    assert torch.equal(buffer, before)
    assert sink.item() == pytest.approx(buffer.double().sum().item(), rel=1e-4, abs=1e-3)


class _StandInEvent:
    """torch.cuda.Event's timing interface over perf_counter (the calls are synchronous on CPU)."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_cuda_timing_path_flushes_by_a_read_before_every_repetition(monkeypatch):
    flushes = []
    real_flush = harness.l2_flush

    def counting_flush(buffer, sink):
        version = buffer._version
        real_flush(buffer, sink)
        flushes.append(buffer._version == version)

    monkeypatch.setattr(harness, "l2_flush", counting_flush)
    timer = harness.EventTimer(CPU, event=_StandInEvent, synchronize=lambda: None, flush_bytes=1 << 16)

    def slow():
        time.sleep(0.02)

    def fast():
        pass

    cases = [Case("op", "a", "m", {}, slow), Case("op", "b", "m", {}, fast)]
    timings = harness.time_group(cases, CPU, MINIMAL, timer=timer)
    assert [t.reps for t in timings] == [3, 3]
    assert len(flushes) == 6 and all(flushes), "one read-only flush before every timed repetition"
    assert timings[0].median_ms >= 20.0 > timings[1].median_ms, "the events time the call, not the flush"


def test_read_only_ceiling_is_measured_beside_the_copy(monkeypatch):
    monkeypatch.setattr(harness, "cache_bytes", lambda device: 1 << 20)
    env = harness.environment(CPU, "quick")
    measured = bench_run.measure_ceilings("quick", CPU, env, "run", "start", MINIMAL)
    by_op = {row["op"]: row for row, _ in measured}
    assert set(by_op) == {"ceiling:copy", "ceiling:read", "ceiling:matmul"}
    read = by_op["ceiling:read"]
    assert read["status"] == "ok" and read["bytes"] == read["size"]["bytes"] >= 64 << 20
    ceilings = bench_run.best_ceilings(measured)
    assert ceilings["read_gbps"] == pytest.approx(read["bytes"] / (read["q20_ms"] / 1e3) / 1e9)
    row = harness.make_row(env, "run", "m", Case("op", "p", "fwd", {}, lambda: None, bytes=10**9), 0)
    harness.fill_rates(row, harness.Timing(100.0, 90.0, 110.0, 3), ceilings)
    assert row["gbps"] == pytest.approx(10.0)
    assert row["pct_read_bw"] == pytest.approx(100 * 10.0 / ceilings["read_gbps"])
    assert row["pct_copy_bw"] == pytest.approx(100 * 10.0 / ceilings["copy_gbps"])


class _StandInKinetoEvent:
    def __init__(self, device_type, ns):
        self._type, self._ns = device_type, ns

    def device_type(self):
        return self._type

    def duration_ns(self):
        return self._ns


def test_kernel_time_sums_the_device_activity_of_the_profiler():
    events = [
        _StandInKinetoEvent("DeviceType.CPU", 5_000_000),  # cudaLaunchKernel on the host: not device time
        _StandInKinetoEvent("DeviceType.CUDA", 1_500),
        _StandInKinetoEvent("DeviceType.CUDA", 2_500),
    ]
    assert harness.device_activity(events) == (2, pytest.approx(0.004))


def test_small_op_rows_get_host_time_and_say_what_is_cuda_only():
    env = harness.environment(CPU, "quick")

    def fn():
        time.sleep(0.001)

    small = Case("ce", "p", "fwd", {"N": 32}, fn, launch_profile=True)
    plain = Case("ce", "q", "fwd", {"N": 32}, fn)
    (row, _), (plain_row, _) = bench_run.run_group([small, plain], CPU, MINIMAL, env, "run", "m", 0)
    assert row["status"] == "ok" and row["host_ms"] >= 1.0
    assert row["graph_ms"] is None and row["kernel_ms"] is None and "CUDA only" in row["launch_note"]
    assert plain_row["host_ms"] is None and plain_row["launch_note"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the CUDA profiler need a GPU")
def test_small_op_fields_on_cuda():
    device = torch.device("cuda")
    x = torch.randn(4096, device=device)
    case = Case("op", "p", "fwd", {}, lambda: (x * 2).sum(), launch_profile=True)
    launches, kernel_ms = harness.profile_device(case, device)
    assert launches >= 1 and kernel_ms > 0
    fields = harness.launch_profile(case, device)
    assert fields["host_ms"] > 0 and fields["graph_ms"] > 0, fields["launch_note"]


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True).stdout


def test_rows_record_the_hash_of_the_uncommitted_diff(tmp_path, monkeypatch):
    """`dirty: True` alone cannot say what ran; the diff's sha256 can (and matches a saved patch)."""
    monkeypatch.delenv("FASTMFT_COMMIT", raising=False)
    monkeypatch.delenv("FASTMFT_DIFF_SHA256", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD").decode().strip()
    assert harness.source_state(repo) == dict(commit=head, dirty=False, diff_sha256=None)
    (repo / "a.py").write_text("x = 2\n")
    first = harness.source_state(repo)
    assert first["dirty"] is True and first["commit"] == head
    assert first["diff_sha256"] == hashlib.sha256(_git(repo, "diff", "--binary", "HEAD")).hexdigest()
    (repo / "a.py").write_text("x = 3\n")
    assert harness.source_state(repo)["diff_sha256"] not in (None, first["diff_sha256"])
    # a copied tree without git: the hash computed where git was, passed in the environment
    bare = tmp_path / "copy"
    bare.mkdir()
    monkeypatch.setenv("FASTMFT_COMMIT", head)
    monkeypatch.setenv("FASTMFT_DIFF_SHA256", first["diff_sha256"])
    assert harness.source_state(bare) == dict(commit=head, dirty=None, diff_sha256=first["diff_sha256"])


# --- the committed rows -----------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_committed_gpu_rows_that_ran_other_inputs_are_marked_invalid():
    """The late-binding bug's rows stay in the archive (they are what ran) but say why they are not
    measurements; no marked row reaches the results the summary is rendered from."""
    run = _rows(GPU_RESULTS / "2026-11-30-e2f9336" / "results.jsonl")
    compiled_sums = [
        r for r in run if r["op"] == "prototype_sums" and r["provider"] == "torch-compile" and r["size"]["N"] != 2**20
    ]
    assert len(compiled_sums) == 2 and all(r.get("invalid") for r in compiled_sums)
    pool_errors = [r for r in run if r["op"] == "masked_mean_pool" and r["status"] == "error"]
    assert len(pool_errors) == 12 and all(r.get("invalid") for r in pool_errors)
    for r in run:  # a time no device can reach is never left unmarked
        if r["kind"] == "case" and (r.get("pct_copy_bw") or 0) > 150:
            assert r.get("invalid"), (r["op"], r["provider"], r["size_label"])
    committed = _rows(ROOT / "benchmarks" / "results" / harness.RESULTS_FILE)
    assert not [r for r in committed if r.get("invalid")]


# --- benchmarks/gpu_session.sh, with a CPU stand-in for python ----------------------------------

STANDIN = r"""
import json, os, sys, time
args = sys.argv[1:]
if args[:2] == ["-m", "benchmarks.run"]:
    module = args[args.index("--only") + 1]
    out = args[args.index("--results-dir") + 1]
    for i, step in enumerate(json.loads(os.environ["STANDIN_PLAN"]).get(module, [])):
        if step == "hang":
            time.sleep(1000)
        time.sleep(step)
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(json.dumps({"module": module, "group": i}) + "\n")
elif args[:2] == ["-m", "benchmarks.bench_score"]:
    with open(args[args.index("--out") + 1], "a") as f:
        f.write(json.dumps({"provider": "fastmft-score"}) + "\n")
elif args[:2] == ["-m", "pytest"]:
    print("3 passed")
"""


def _session(tmp_path, command, plan, **limits):
    standin = tmp_path / "python"
    (tmp_path / "standin.py").write_text(STANDIN)
    standin.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "standin.py"}" "$@"\n')
    standin.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(standin), BENCH_DEVICE="cpu", STANDIN_PLAN=json.dumps(plan))
    env.update({k: str(v) for k, v in limits.items()})
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), command, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = (out / "summary.txt").read_text()
    return rows, summary, wall, out


def test_gpu_session_kernels_keeps_every_row_when_a_stage_times_out(tmp_path):
    plan = {"pooling": [0.1, "hang"], "typicality": [0.1, 0.1], "cross_entropy": [0.1], "inner_step": [0.1, 0.1]}
    rows, summary, wall, out = _session(tmp_path, "kernels", plan, POOLING_LIMIT=3, TOTAL_LIMIT=30)
    groups = [(r["module"], r["group"]) for r in rows]
    assert groups == [
        ("pooling", 0),  # written before the hang: kept
        ("typicality", 0),
        ("typicality", 1),
        ("cross_entropy", 0),
        ("inner_step", 0),
        ("inner_step", 1),
    ]
    assert "smoke rc=0" in summary and "pooling rc=124" in summary and "inner_step rc=0" in summary
    assert wall < 3 + 12, "the hung stage was stopped at its limit"
    assert (out / "smoke.log").read_text().strip() == "3 passed"
    assert len(list(out.iterdir())) <= 8, "the device tool returns at most 8 files"


def test_gpu_session_stops_at_its_total_limit_and_says_what_it_skipped(tmp_path):
    plan = {"mft_step": [0.1, "hang"], "utility": [0.1]}
    rows, summary, wall, out = _session(tmp_path, "end2end", plan, MFT_STEP_LIMIT=100, TOTAL_LIMIT=20)
    assert [(r["module"], r["group"]) for r in rows] == [("mft_step", 0)]
    assert "mft_step rc=124" in summary
    assert "utility skipped: no time left" in summary and "score skipped: no time left" in summary
    assert wall < 20 + 6, "the call ends inside its total limit"
    assert not (out / "score.jsonl").exists()


def test_ab_copies_run_the_earlier_kernel_file_for_the_whole_call(tmp_path, monkeypatch):
    """An A/B provider swaps the earlier kernels/<name>.py in for forward AND backward, then restores."""
    from fastmft.ops import triton as triton_ops

    today = triton_ops._pool
    (tmp_path / "pooling.py").write_text(Path(today.__file__).read_text() + "\nAB_COPY = True\n")
    monkeypatch.setenv(harness.AB_KERNELS_ENV, str(tmp_path))
    monkeypatch.setenv(harness.AB_REF_ENV, "0123456789abcdef")
    seen = []
    probe = Case("op", harness.TRITON, "fwd+bwd", {"N": 1}, lambda: seen.append(triton_ops._pool.__name__))
    eager = Case("op", harness.EAGER, "fwd", {"N": 1}, lambda: None)
    (copy,) = harness.ab_cases([probe, eager], "pooling")
    assert copy.provider == "triton@0123456789" and copy.mode == "fwd+bwd"
    copy.fn()
    probe.fn()
    assert seen == ["fastmft.kernels._ab_pooling", today.__name__] and triton_ops._pool is today

    from benchmarks import bench_pooling

    group = harness.flat_cases(bench_pooling.cases("quick", CPU))
    ours = {c.mode: c for c in group if c.provider == harness.TRITON}
    theirs = {c.mode: c for c in group if c.provider.startswith("triton@")}
    assert set(ours) == set(theirs) == {"fwd", "fwd+bwd"}
    torch.testing.assert_close(theirs["fwd"].fn(), ours["fwd"].fn(), rtol=0, atol=0)
    monkeypatch.delenv(harness.AB_KERNELS_ENV)
    assert harness.ab_cases(group, "pooling") == []
