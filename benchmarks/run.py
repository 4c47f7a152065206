"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--only a,b] [--device cpu|cuda]``.

Discovers every ``benchmarks/bench_<name>.py`` (or the ``--only`` subset), measures the device's
ceilings, times every case, and appends one JSON line per case and per ceiling to
``<results-dir>/results.jsonl`` (default ``runs/bench/``, untracked; ``--record``: the committed
``benchmarks/results/``), group by group as they are measured: a run killed by a time limit keeps
every group it finished. A case, module or import that fails is recorded as a row with
``status: "error"`` and the run goes on; the exit status is 1 if anything failed, so CI notices a
benchmark that rotted. ``--quick`` is the CPU sanity scale (tiny sizes, about two minutes on two
cores); the default ``full`` scale is meant for a GPU. Render the report with
``python -m benchmarks.plot``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _early_env(argv: list[str]) -> None:
    # TRITON_INTERPRET must be set before triton is first imported (torch._dynamo and
    # transformers import it), i.e. before anything below.
    if "--interpret" in argv:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    _early_env(sys.argv[1:])

import gc  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Names of the benchmark modules: ``bench_<name>.py`` -> ``<name>``, sorted."""
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if m.name.startswith("bench_")
    )


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:9.4f}" if ms < 1 else f"{ms:9.2f}")


def _print_row(r: dict) -> None:
    extra = []
    if r.get("gbps"):
        extra.append(f"{r['gbps']:.1f} GB/s")
    if r.get("tflops"):
        extra.append(f"{r['tflops']:.3f} TFLOP/s")
    if r.get("pct_ceiling") is not None:
        extra.append(f"{r['pct_ceiling']:.0f}% ceil")
    if r.get("pct_read_bw") is not None:
        extra.append(f"{r['pct_read_bw']:.0f}% read")
    for key in ("kernel_ms", "host_ms", "graph_ms"):
        if r.get(key) is not None:
            extra.append(f"{key.split('_')[0]} {r[key]:.4f} ms")
    if r.get("items_per_s"):
        extra.append(f"{r['items_per_s']:.1f} items/s")
    if r.get("peak_mem_bytes") is not None:
        extra.append(f"peak {r['peak_mem_bytes'] / 2**20:.1f} MiB")
    if r["status"] != "ok":
        extra.append(f"ERROR {r['error'].splitlines()[-1] if r['error'] else ''}")
    print(
        f"  {r['op'] or '?':28s} {r['provider'] or '?':16s} {r['mode'] or '':12s} {r['size_label'] or '':32s} "
        f"{_fmt_ms(r['median_ms'])} ms  " + "  ".join(extra),
        flush=True,
    )


def _error_row(
    env: dict, run_id: str, module: str, exc: BaseException, case: Case | None = None, index: int | None = None
) -> dict:
    if case is None:
        case = Case(op=f"<{module}>", provider="-", mode="-", size={}, fn=lambda: None)
    row = harness.make_row(env, run_id, module, case, index if index is not None else -1)
    row["status"] = "error"
    row["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return row


def run_group(
    cases: list[Case],
    device: torch.device,
    budget: harness.Budget,
    env: dict,
    run_id: str,
    module: str,
    first_index: int,
    kind: str = "case",
    memory: bool = True,
) -> list[tuple[dict, harness.Timing | None]]:
    """Time cases interleaved (harness.time_group), then measure each one's peak memory, device
    activity and (``launch_profile`` cases) host time and CUDA-graph floor."""
    rows = [harness.make_row(env, run_id, module, c, first_index + i, kind=kind) for i, c in enumerate(cases)]
    try:
        timings = harness.time_group(cases, device, budget)
    except Exception as exc:
        timings = [exc] * len(cases)
    out = []
    for case, row, timing in zip(cases, rows, timings):
        if not isinstance(timing, BaseException) and memory:
            try:
                row["peak_mem_bytes"], row["mem_method"] = harness.peak_memory(case, device)
                row["device_launches"], row["kernel_ms"] = harness.profile_device(case, device)
                if case.launch_profile:
                    row.update(harness.launch_profile(case, device))
            except Exception as exc:
                timing = exc
        if isinstance(timing, BaseException):  # recorded, never fatal: one broken case must not hide the others
            row["status"] = "error"
            row["error"] = "".join(traceback.format_exception(type(timing), timing, timing.__traceback__))[-4000:]
            timing = None
        else:
            row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, reps=timing.reps)
        out.append((row, timing))
    return out


def measure_ceilings(
    scale: str, device: torch.device, env: dict, run_id: str, phase: str, budget: harness.Budget
) -> list[tuple[dict, harness.Timing | None]]:
    out = []
    for i, (_, case) in enumerate(harness.ceiling_cases(scale, device)):
        case.size = dict(case.size, phase=phase)
        out.extend(run_group([case], device, budget, env, run_id, "harness", i, kind="ceiling", memory=False))
        del case
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def best_ceilings(measured: list[tuple[dict, harness.Timing | None]]) -> dict[str, float]:
    ceilings: dict[str, float] = {}
    for row, _ in measured:
        if row["kind"] != "ceiling":
            continue
        rate = harness.ceiling_rate(row)
        if rate is None:
            continue
        key = harness.CEILING_KEYS[row["op"]]
        ceilings[key] = max(ceilings.get(key, 0.0), rate)
    return ceilings


def run(
    scale: str = "full",
    only: list[str] | None = None,
    device: torch.device | str | None = None,
    results_dir: Path | str = harness.LOCAL_RESULTS_DIR,
    write: bool = True,
    verbose: bool = True,
    budget: harness.Budget | None = None,
) -> list[dict]:
    """Run the suite; returns the rows (also appended to ``results_dir/results.jsonl`` if write).
    ``budget`` overrides the timing budget of the scale (tests use a minimal one)."""
    if scale not in harness.SCALES:
        raise ValueError(f"scale must be one of {harness.SCALES}, got {scale!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = discover()
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"unknown benchmark module(s) {unknown}; available: {names}")
        names = [n for n in names if n in only]
    env = harness.environment(device, scale)
    run_id = f"{env['date']}-{uuid.uuid4().hex[:8]}"
    budget = budget or harness.budget_for(scale, device)
    t_start = time.perf_counter()
    if verbose:
        print(
            f"fastmft benchmarks: scale={scale} device={env['device_name']} torch={env['torch']} "
            f"triton={env['triton']} commit={(env['commit'] or '?')[:10]}{'+dirty' if env['dirty'] else ''}",
            flush=True,
        )
    all_rows: list[dict] = []

    def record(results: list[tuple[dict, harness.Timing | None]], ceilings: dict[str, float]) -> None:
        """Fill the rates against the ceilings known now, relate the group's providers, write."""
        rows = []
        for row, timing in results:
            harness.fill_rates(row, timing, ceilings)
            rows.append(row)
        harness.fill_speedups(rows)
        if write:
            harness.append_rows(rows, results_dir)
        all_rows.extend(rows)
        if verbose:
            for row in rows:
                _print_row(row)

    start = measure_ceilings(scale, device, env, run_id, "start", budget)
    ceilings = best_ceilings(start)  # the rates of every case row are against these
    if verbose:
        print("ceilings (start):", flush=True)
    record(start, ceilings)
    index = 0
    for name in names:
        module_name = f"benchmarks.bench_{name}"
        if verbose:
            print(f"[{name}]", flush=True)
        t_mod = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            groups = harness.case_groups(module.cases(scale, device))
        except Exception as exc:
            record([(_error_row(env, run_id, name, exc), None)], ceilings)
            continue
        while True:
            # The module resumes (and may rebind its variables for the next size) only after the
            # previous group has been timed and written.
            try:
                group = next(groups)
            except StopIteration:
                break
            except Exception as exc:  # building the next group failed: record it and leave the module
                record([(_error_row(env, run_id, name, exc, index=index), None)], ceilings)
                break
            record(run_group(group, device, budget, env, run_id, name, index), ceilings)
            index += len(group)
            del group
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del groups
        gc.collect()
        if verbose:
            print(f"  ({time.perf_counter() - t_mod:.1f} s)", flush=True)
    end = measure_ceilings(scale, device, env, run_id, "end", budget)
    if verbose:
        print("ceilings (end):", flush=True)
    record(end, best_ceilings(start + end))
    if verbose:
        print(f"case rows' ceilings (the start's, at the 20 % quantile time): {ceilings}", flush=True)
        if write:
            print(
                f"{len(all_rows)} rows appended to {Path(results_dir) / harness.RESULTS_FILE} "
                f"in {time.perf_counter() - t_start:.1f} s",
                flush=True,
            )
    return all_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU sanity scale: tiny sizes, short budgets (CI)")
    parser.add_argument("--scale", choices=harness.SCALES, help="quick or full (default full; --quick = --scale quick)")
    parser.add_argument("--only", default="", help="comma-separated module names, e.g. pooling,mft_step")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    harness.results_dir_arg(parser)
    parser.add_argument("--no-write", action="store_true", help="print only, append nothing")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run Triton kernels on CPU through the interpreter (sanity only: such rows are "
        "marked interpreted and are not performance data)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); recorded in device_name"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(discover()))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or ("quick" if args.quick else "full")
    only = [s.strip().removeprefix("bench_") for s in args.only.split(",") if s.strip()]
    rows = run(scale, only or None, args.device, harness.chosen_results_dir(args), write=not args.no_write)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} benchmark(s) failed:", file=sys.stderr)
        for r in failed:
            print(
                f"  [{r['module']}] {r['op']} {r['provider']} {r['mode']} {r['size_label']}: "
                f"{(r['error'] or '').strip().splitlines()[-1] if r['error'] else ''}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
