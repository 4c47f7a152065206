"""Render the benchmark report: ``python -m benchmarks.plot [--results-dir DIR | --record]``.

Reads ``<results-dir>/results.jsonl`` (default ``runs/bench/``, where ``benchmarks.run`` writes;
``--record``: the committed ``benchmarks/results/``) and writes, next to it:
- ``plots/<device>-<scale>-<op>-<mode>.png``: time (median, 20-80 % band) and % of ceiling vs
  size, one line per provider (plus examples/s for end-to-end rows);
- ``SUMMARY.md``: the GPU goals of the issues with their status, then per device and scale the
  ceilings and one table per op (time, GB/s, TFLOP/s, % of ceiling, examples/s, peak memory,
  speedup against each other provider of the same run), and the failed cases.
For every (device, scale, op, provider, mode, size) the newest row is shown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import harness

# The speed goals of the issues for a GPU (issues 3 and 4). A goal matches the rows on CUDA whose op
# contains `op`, whose mode contains `mode`, whose provider starts with `provider` (or equals it when
# `exact`), and whose size agrees with every key of `size` that the row's size has (keys compared
# case-insensitively; a (lo, hi) tuple is an inclusive range; bf16 == bfloat16).
_FUSED = "fastmft"  # fastmft, fastmft-triton, fastmft-c, ...
GPU_GOALS = [
    dict(
        name="pooling [L=3, B=256, T=512, D=768] bf16: >= 85 % of copy bandwidth, 2x eager, faster than torch.compile",
        op="pool",
        mode="",
        provider=_FUSED,
        size=dict(L=3, B=256, T=512, D=768, dtype="bf16"),
        checks=[("pct_copy_bw", 85.0), ("speedup:" + harness.EAGER, 2.0), ("speedup:" + harness.COMPILED, 1.0)],
    ),
    dict(
        name="typicality N = 4M, D = 768 bf16, K = 5: >= 80 % of copy bandwidth, 2x eager",
        op="typicality",
        mode="",
        provider=_FUSED,
        size=dict(N=4 * 2**20, D=768, K=5, dtype="bf16"),
        checks=[("pct_copy_bw", 80.0), ("speedup:" + harness.EAGER, 2.0)],
    ),
    dict(
        name="multi-head CE, MFT-sized batches (B = 32..256, 4 heads) fwd+bwd: 3x eager",
        op="cross_entropy",
        mode="bwd",
        provider=_FUSED,
        size=dict(N=(32, 256), heads=4),
        checks=[("speedup:" + harness.EAGER, 3.0), ("device_launches", None)],
    ),
    dict(
        name="multi-head CE, N = 1M rows: 2x eager",
        op="cross_entropy",
        mode="",
        provider=_FUSED,
        size=dict(N=2**20),
        checks=[("speedup:" + harness.EAGER, 2.0)],
    ),
    dict(
        name="inner step (BERT-base / MiniLM parameter sets): >= 85 % of copy bandwidth",
        op="inner_step",
        mode="",
        provider=_FUSED,
        size={},
        checks=[("pct_copy_bw", 85.0)],
    ),
    dict(
        name="MFT training step: examples/s and peak memory against the plain HF baseline (no numeric goal)",
        op="mft_step",
        mode="",
        provider="fastmft",
        exact=True,
        size={},
        checks=[("speedup:hf-eager", None)],
    ),
]

NOT_ON_GPU = "not yet measured on a GPU"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def latest(rows: list[dict]) -> list[dict]:
    """The newest row of every (device, scale, kind, op, provider, mode, size)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (
            r.get("device_name"),
            r.get("scale"),
            r.get("kind"),
            r.get("op"),
            r.get("provider"),
            r.get("mode"),
            harness.size_key(r.get("size") or {}),
        )
        if key not in best or (r.get("date") or "", r.get("run_id") or "") >= (
            best[key].get("date") or "",
            best[key].get("run_id") or "",
        ):
            best[key] = r
    return list(best.values())


def _fmt(x, spec: str = ".3g", none: str = "–") -> str:
    if x is None:
        return none
    return format(x, spec)


def _ms(r: dict) -> str:
    if r.get("median_ms") is None:
        return "–"
    return f"{r['median_ms']:.4g} [{r['q20_ms']:.4g}–{r['q80_ms']:.4g}]"


def _mem(r: dict) -> str:
    b = r.get("peak_mem_bytes")
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _speedups(r: dict) -> str:
    sv = r.get("speedup_vs") or {}
    return ", ".join(f"{v:.2f}x vs {k}" for k, v in sorted(sv.items())) or "–"


def _norm(v) -> str:
    text = str(v).lower()
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(text, text)


def _size_matches(row_size: dict, spec: dict) -> bool:
    lower = {str(k).lower(): v for k, v in (row_size or {}).items()}
    shared = [k for k in spec if k.lower() in lower]
    if spec and not shared:
        return False
    for k in shared:
        want, got = spec[k], lower[k.lower()]
        if isinstance(want, tuple):
            if not (isinstance(got, (int, float)) and want[0] <= got <= want[1]):
                return False
        elif _norm(got) != _norm(want):
            return False
    return True


def _provider_matches(provider: str, goal: dict) -> bool:
    return provider == goal["provider"] if goal.get("exact") else provider.startswith(goal["provider"])


def goal_status(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(goal, status, evidence) for each GPU goal, from the newest CUDA rows."""
    gpu = [r for r in rows if r.get("device") == "cuda" and r.get("kind") == "case" and r.get("status") == "ok"]
    out = []
    for goal in GPU_GOALS:
        if not gpu:
            out.append((goal["name"], NOT_ON_GPU, "no GPU rows in results.jsonl"))
            continue
        matches = [
            r
            for r in gpu
            if goal["op"] in r["op"]
            and goal["mode"] in r["mode"]
            and _provider_matches(r["provider"], goal)
            and _size_matches(r["size"], goal["size"])
        ]
        if not matches:
            out.append(
                (
                    goal["name"],
                    "no matching GPU row",
                    f"op~{goal['op']!r} provider={goal['provider']} size~{goal['size']}",
                )
            )
            continue
        verdicts, evidence = [], []
        for r in matches:
            ok = True
            parts = [f"{r['op']} {r['mode']} {r['size_label']}"]
            for metric, threshold in goal["checks"]:
                if metric.startswith("speedup:"):
                    value = (r.get("speedup_vs") or {}).get(metric.split(":", 1)[1])
                    parts.append(f"{_fmt(value, '.2f')}x vs {metric.split(':', 1)[1]}")
                else:
                    value = r.get(metric)
                    parts.append(
                        f"{_fmt(value, 'd')} device launches"
                        if metric == "device_launches"
                        else f"{_fmt(value, '.1f')} % {metric}"
                    )
                if threshold is not None:
                    ok = ok and value is not None and value >= threshold
            verdicts.append(ok)
            evidence.append(", ".join(parts))
        has_threshold = any(t is not None for _, t in goal["checks"])
        status = (
            ("met" if all(verdicts) else "NOT met" if not any(verdicts) else "partly met")
            if has_threshold
            else "measured"
        )
        out.append((goal["name"], status, "; ".join(evidence[:6]) + (" …" if len(evidence) > 6 else "")))
    return out


def plot_group(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in sorted(rows, key=lambda r: r.get("case_index") or 0):
        if r["size_label"] not in labels:
            labels.append(r["size_label"])
    x_of = {label: i for i, label in enumerate(labels)}
    has_pct = any(r.get("pct_ceiling") is not None for r in rows)
    has_items = any(r.get("items_per_s") for r in rows)
    panels = 1 + has_pct + has_items
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = axes[0]
    providers = sorted({r["provider"] for r in rows})
    for provider in providers:
        pr = sorted(
            (r for r in rows if r["provider"] == provider and r.get("median_ms") is not None),
            key=lambda r: x_of[r["size_label"]],
        )
        if not pr:
            continue
        xs = [x_of[r["size_label"]] for r in pr]
        med = [r["median_ms"] for r in pr]
        axes[0].plot(xs, med, marker="o", label=provider)
        axes[0].fill_between(xs, [r["q20_ms"] for r in pr], [r["q80_ms"] for r in pr], alpha=0.2)
        k = 1
        if has_pct:
            pts = [(x, r["pct_ceiling"]) for x, r in zip(xs, pr) if r.get("pct_ceiling") is not None]
            if pts:
                axes[k].plot(*zip(*pts), marker="o", label=provider)
            k += 1
        if has_items:
            pts = [(x, r["items_per_s"]) for x, r in zip(xs, pr) if r.get("items_per_s")]
            if pts:
                axes[k].plot(*zip(*pts), marker="o", label=provider)
    names = ["time per call (ms), median and 20-80 %"]
    if has_pct:
        names.append("% of ceiling (copy BW or matmul)")
    if has_items:
        names.append("items / s (examples or rows)")
    for ax, name in zip(axes, names):
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


class MissingMatplotlib(RuntimeError):
    """Plots were asked for but matplotlib is not installed."""


def render(results_dir: Path | str = harness.LOCAL_RESULTS_DIR, plots: bool = True) -> Path:
    """Write plots/ and SUMMARY.md under results_dir; returns the summary's path. Raises
    MissingMatplotlib, before writing anything, when plots are asked for without matplotlib."""
    results_dir = Path(results_dir)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MissingMatplotlib(
                "the plots need matplotlib: `.venv/bin/pip install matplotlib` "
                "(or pass --no-plots for SUMMARY.md alone)"
            ) from None
    rows = latest(harness.read_rows(results_dir))
    lines = [
        "# fastmft benchmark summary",
        "",
        "Generated by `python -m benchmarks.plot` from `results.jsonl` (newest row of every device, scale, op, "
        "provider, mode and size). Rerun the suite with `python -m benchmarks.run` on a GPU (full scale) or "
        "`python -m benchmarks.run --quick` on CPU; see [benchmarks/README.md](../README.md) for the fields and methods.",
        "",
        "Times are medians with the [20 %–80 %] quantiles, in ms per call. % of ceiling is against the device's own "
        "copy bandwidth (GB/s columns) or matmul rate (TFLOP/s columns) measured in the same run; `speedup` is "
        "median(other) / median(this) in the same run (> 1: this provider is faster).",
        "",
        "## GPU goals",
        "",
    ]
    goals = goal_status(rows)
    if all(status == NOT_ON_GPU for _, status, _ in goals):
        lines += [
            f"**All GPU goals: {NOT_ON_GPU}.** The rows below are CPU measurements; the GPU goals of the "
            "kernel and extension issues need `python -m benchmarks.run` on a CUDA machine.",
            "",
        ]
    lines += ["| goal | status | evidence |", "|---|---|---|"]
    lines += [f"| {g} | {s} | {e} |" for g, s, e in goals]
    lines.append("")

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("device"), r.get("device_name"), r.get("scale")), []).append(r)
    if not groups:
        lines += [
            "No results yet: run `python -m benchmarks.run --quick` (CPU) or `python -m benchmarks.run` (GPU).",
            "",
        ]
    for (device, name, scale), grows in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "cuda", str(kv[0][1]), str(kv[0][2]))
    ):
        newest = max(grows, key=lambda r: r.get("date") or "")
        lines += [
            f"## {name} ({device}, scale {scale})",
            "",
            f"Newest run {newest.get('date')} · torch {newest.get('torch')} · triton {newest.get('triton')} · "
            f"transformers {newest.get('transformers')} · Python {newest.get('python')} · commit "
            f"`{(newest.get('commit') or '?')[:10]}`{' (uncommitted changes)' if newest.get('dirty') else ''} · "
            f"timing: {newest.get('timing_method')}"
            + (" · **Triton interpreter: not performance data**" if any(r.get("interpreted") for r in grows) else ""),
            "",
        ]
        loads = [r["loadavg"] for r in grows if r.get("loadavg") is not None]
        if device != "cuda" and loads and max(loads) > 1.5:
            lines += [
                f"Note: the 1-minute load average reached {max(loads):.1f} during these measurements (other "
                "processes shared the CPU), so CPU times are noisier and slower than on an idle machine.",
                "",
            ]
        ceil = [r for r in grows if r.get("kind") == "ceiling" and r.get("status") == "ok"]
        if ceil:
            lines += [
                "Ceilings (measured at the start and the end of the run; the best rate at the 20 % quantile is used):",
                "",
                "| ceiling | mode | size | time ms [q20–q80] | rate |",
                "|---|---|---|---|---|",
            ]
            for r in sorted(ceil, key=lambda r: (r["op"], r["size_label"])):
                rate = harness.ceiling_rate(r)
                unit = "GB/s" if r.get("bytes") else "TFLOP/s"
                lines.append(f"| {r['op']} | {r['mode']} | {r['size_label']} | {_ms(r)} | {_fmt(rate, '.3g')} {unit} |")
            lines.append("")
        cases = [r for r in grows if r.get("kind") == "case" and r.get("status") == "ok"]
        for op, mode in sorted({(r["op"], r["mode"]) for r in cases}):
            ops = sorted(
                (r for r in cases if r["op"] == op and r["mode"] == mode),
                key=lambda r: (r.get("case_index") or 0, r["provider"]),
            )
            plot_path = (
                results_dir / "plots" / f"{_slug(str(device) + '-' + str(name))}-{scale}-{_slug(op)}-{_slug(mode)}.png"
            )
            if plots:
                plot_group(ops, plot_path, f"{op} · {mode} · {name} ({scale})")
            lines += (
                [f"### {op} · {mode}", ""]
                + ([f"![{op} {mode}](plots/{plot_path.name})", ""] if plots else [])
                + [
                    "| size | provider | time ms [q20–q80] | GB/s | TFLOP/s | % ceiling | items/s | peak MiB | speedup |",
                    "|---|---|---|---|---|---|---|---|---|",
                ]
            )
            for r in ops:
                provider = r["provider"] + (" (Triton interpreter)" if r.get("interpreted") else "")
                lines.append(
                    f"| {r['size_label']} | {provider} | {_ms(r)} | {_fmt(r.get('gbps'))} | {_fmt(r.get('tflops'))} | "
                    f"{_fmt(r.get('pct_ceiling'), '.1f')} | {_fmt(r.get('items_per_s'), '.1f')} | {_mem(r)} | {_speedups(r)} |"
                )
            lines.append("")
        mem_methods = sorted({r.get("mem_method") for r in cases if r.get("mem_method")})
        if mem_methods:
            lines += [
                f"Peak memory: the most the call held above what was allocated before it ({'; '.join(mem_methods)}).",
                "",
            ]
        errors = [r for r in grows if r.get("status") != "ok"]
        if errors:
            lines += ["Failed cases (newest run of each):", ""]
            for r in errors:
                msg = (r.get("error") or "").strip().splitlines()
                lines.append(
                    f"- `{r['module']}` {r['op']} {r['provider']} {r['mode']} {r['size_label']}: {msg[-1] if msg else ''}"
                )
            lines.append("")
    lines += score_section(results_dir / "score.jsonl")
    path = results_dir / "SUMMARY.md"
    path.write_text("\n".join(lines))
    return path


def score_section(path: Path) -> list[str]:
    """The whole-command scoring runs of ``python -m benchmarks.bench_score`` (score.jsonl): one
    table per setting (data, model, lengths, device, threads) with the newest row of each provider,
    its rows/s and peak RSS, and the notes stored with those rows."""
    if not path.is_file():
        return []
    runs: dict[tuple, dict[str, dict]] = {}
    fidelity: dict[tuple, dict] = {}  # bench_score --fidelity rows: Spearman of runs timed without a reference
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            key = (r["data"], r["model"], r["max_length"], r["batch_size"], r["device"], r.get("threads"))
            if r.get("kind") == "fidelity":
                fidelity[(*key, r["provider"])] = r
                continue
            runs.setdefault(key, {})[r["provider"]] = r  # a rerun of a provider replaces its earlier row
    for key, by in runs.items():
        for name, r in by.items():
            if r.get("spearman_vs_fp32") is None and (*key, name) in fidelity:
                r["spearman_vs_fp32"] = fidelity[(*key, name)]["spearman_vs_fp32"]
    lines = [
        "## fastmft score end to end (`benchmarks/results/score.jsonl`)",
        "",
        "Whole process, one fresh subprocess per provider: `fastmft-score` (the command), `naive` (random order, "
        "batches padded to max length, two encoder passes), `peer` (sentence-transformers style: length-sorted, "
        "all embeddings in memory, typicality in numpy); `-fp32`/`-bf16`/`-int8`: `--precision`, `st-*`: "
        "sentence-transformers' encode (Spearman of the scores against fastmft fp32 shown where measured).",
        "",
    ]
    for (data, model, max_len, batch, device, threads), by in runs.items():
        lines += [f"### {data} · {model} · max length {max_len} · batch {batch} · {device} ({threads} threads)", ""]
        notes = dict.fromkeys(r.get("note") for r in by.values() if r.get("note"))
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        lines += [
            "| provider | rows | wall s | rows/s | peak RSS MiB | vs naive | vs peer | date |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in by.items():
            rel = {
                b: f"{r['rows_per_s'] / by[b]['rows_per_s']:.2f}x" if b in by and b != name else "–"
                for b in ("naive", "peer")
            }
            spearman = f" (Spearman {r['spearman_vs_fp32']:.3f})" if r.get("spearman_vs_fp32") is not None else ""
            lines.append(
                f"| {name}{spearman} | {r['rows']} | {r['wall_s']:.1f} | {r['rows_per_s']:.1f} | "
                f"{r['peak_rss_bytes'] / 2**20:.0f} | {rel['naive']} | {rel['peer']} | {r['date'][:16]} |"
            )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    harness.results_dir_arg(parser)
    parser.add_argument("--no-plots", action="store_true", help="write SUMMARY.md only")
    args = parser.parse_args(argv)
    results_dir = harness.chosen_results_dir(args)
    if not (results_dir / harness.RESULTS_FILE).is_file():
        print(
            f"benchmarks.plot: error: no {harness.RESULTS_FILE} in {results_dir}/: run "
            "`.venv/bin/python -m benchmarks.run --quick` first, or pass --record for the committed results",
            file=sys.stderr,
        )
        return 2
    try:
        path = render(results_dir, plots=not args.no_plots)
    except MissingMatplotlib as err:
        print(f"benchmarks.plot: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}" + ("" if args.no_plots else f" (plots under {results_dir / 'plots'}/)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
