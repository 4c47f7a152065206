"""What every Triton kernel costs on an H100/H200 (sm_90), read from the code the GPU runs.

    python -m benchmarks.kernel_resources --compile-only   # no GPU: compile for sm_90, ptxas -v (spill gate)
    python -m benchmarks.kernel_resources --static benchmarks/results/static   # no GPU: the static table
    python -m benchmarks.kernel_resources                  # on a CUDA machine: the loaded kernels

Compile-only mode drives Triton's real pipeline to a cubin through a stand-in driver (nothing
runs) and reads ptxas's resource report for sm_90a; tests/kernels/test_kernel_compile.py fails on
any spill here. On a GPU the numbers come from the loaded kernels (n_regs, n_spills, shared).
Both print one JSON line per (kernel, tile) and write them to --out if given.

Static mode calls every op of the kernel benchmarks (benchmarks/bench_{typicality,pooling,
cross_entropy}.py) at the benchmark sizes, forward and forward+backward, through the Triton
implementations of fastmft.ops.triton (so the kernels, their tile tables and their launch
functions are whatever the checkout holds), on CPU tensors that are allocated but never touched,
with launches turned into compile-only warmups. For each launch it disassembles the cubin
(nvdisasm, the one Triton ships) and reports registers, spills, shared memory, programs per SM,
SASS warp-instructions per program (loops weighted by trip counts evaluated from the kernel
source and the launch's arguments: benchmarks/sass.py), SASS instructions per input element
(warp-instructions x 32 / elements), the widest global load and store, asynchronous copies,
barriers per program, and a static time estimate: issue time (warp-instructions / (132 SMs x 4
schedulers x 1 instruction per clock x 1.98 GHz)) against the memory floor (bytes every tensor
argument spans, once, / the 4.22 TB/s copy ceiling measured on the H200). Per call it adds the
launches and the other device operations (fills, copies) the op makes. Writes sm90.json and
sm90.md into the given folder; exit status 1 on any spill or failed call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import torch

# The sizes the benchmarks and the issue name: typicality with K up to 16 domains, prototype sums
# past 32 cells (the tensor-core path), MFT's heads, up to 8 heads, and a 97-class head.
TYPICALITY_DOMAINS = (2, 5, 8, 16)
SUM_CELLS = (6, 48, 100)
HEAD_SETS = ((3, 4, 4, 4), (2,) * 8, (97, 4), (3, 97, 4, 4, 4, 4, 4, 4))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The machine of the estimate (H100/H200 SXM): SMs, schedulers per SM (one warp-instruction per
# clock each), the boost clock, and the device-to-device copy ceiling (read + write) measured on
# the H200 in benchmarks/results/gpu/2026-11-30-e2f9336.
SMS = 132
ISSUE_PER_CLOCK = 4
CLOCK_HZ = 1.98e9
COPY_BYTES_PER_S = 4.22e12
# Kernels whose traffic depends on the data: they read only what an earlier launch of the same
# call flagged (a count in device memory bounds their loop). At the benchmark inputs (finite rows
# of ordinary norm) nothing is flagged, so their floor is that count and their work one check.
FLAGGED_ONLY = {"_typicality_exact_kernel": "rows the GEMM kernel flagged (zero, tiny, huge or non-finite norms)"}


def _ops():
    from fastmft.ops import triton as ops

    return ops


def _backward(out: torch.Tensor) -> None:
    torch.autograd.backward(out, torch.ones_like(out) if out.dim() else torch.ones((), dtype=out.dtype))


def launch_all(device: torch.device) -> None:
    """Launch (or, compile-only, build) every kernel at the configurations of the spill gate:
    every dtype, K up to 16 domains, prototype sums past 32 cells, up to 8 heads, a 97-class head;
    MFT's heads also with sample weights that need no gradient (the benchmarks' case)."""
    ops = _ops()
    for dtype in DTYPES:
        x = torch.randn(4096, 768, device=device).to(dtype)
        y = torch.randint(0, 3, (4096,), device=device)
        for K in TYPICALITY_DOMAINS:
            d = torch.randint(0, K, (4096,), device=device)
            centers = torch.randn(K, 3, 1, 768, device=device)
            ops.typicality(x, y, d, centers, torch.ones(K, 3, 1, dtype=torch.bool, device=device), 0.5, 1.0)
        for C in SUM_CELLS:
            ops.prototype_sums(x, torch.randint(0, C, (4096,), device=device), C)
        layers = [torch.randn(32, 128, 768, device=device).to(dtype).requires_grad_() for _ in range(3)]
        mask = torch.ones(32, 128, dtype=torch.bool, device=device)
        _backward(ops.masked_mean_pool(layers, mask, True))
        for classes in HEAD_SETS:
            logits = [torch.randn(4096, c, device=device).to(dtype).requires_grad_() for c in classes]
            targets = [torch.randint(0, c, (4096,), device=device) for c in classes]
            w = torch.rand(4096, device=device)
            for weight in (w.requires_grad_(), w.detach()) if classes == HEAD_SETS[0] else (w.requires_grad_(),):
                _backward(ops.multi_head_cross_entropy(logits, targets, weight, [1.0] * len(classes), -100))


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this architecture (it ships several)."""
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(arch).path


def _ptxas_report(ptx: str) -> dict:
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        pathlib.Path(src).write_text(ptx)
        proc = subprocess.run(
            [_ptxas(int(re.sub(r"\D", "", arch))), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    text = proc.stderr + proc.stdout

    def number(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(
        arch=arch,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=number(r"(\d+) bytes smem"),
    )


@contextlib.contextmanager
def intercept(compile_only: bool, on_launch):
    """Every JITFunction launch inside the block calls ``on_launch(jit_fn, kernel, args, kwargs,
    grid)``; compile-only turns launches into warmups (compiled, never run)."""
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=warmup or compile_only, **kwargs)
        on_launch(self, kernel, args, kwargs, grid)
        return kernel

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original_run


def _dtype_of(args) -> str:
    tensors = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]
    return next((str(t.dtype).replace("torch.", "") for t in tensors if t.dtype.is_floating_point), "-")


def _config(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}


def collect(compile_only: bool, out: str | None = None) -> list[dict]:
    """One row per (kernel, dtype, tile), appended to ``out`` as soon as it is known (a run cut
    short by a time limit keeps what it measured)."""
    rows: dict[tuple, dict] = {}

    def record(jit, kernel, args, kwargs, grid):
        config = _config(kwargs)
        dtype = _dtype_of(args)
        key = (jit.fn.__name__, dtype, tuple(sorted(config.items())))
        if key in rows:
            return
        if compile_only:
            usage = _ptxas_report(kernel.asm["ptx"])
        else:
            usage = dict(registers=kernel.n_regs, spill_stores=kernel.n_spills, shared=kernel.metadata.shared)
        rows[key] = dict(kernel=jit.fn.__name__, dtype=dtype, config=config, **usage)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(rows[key]) + "\n")

    with intercept(compile_only, record):
        if compile_only:
            stand_in()
            launch_all(torch.device("cpu"))
        else:
            launch_all(torch.device("cuda"))
            torch.cuda.synchronize()
    return list(rows.values())


def stand_in_driver() -> None:
    """Make Triton compile for sm_90 on a machine without a GPU (warmup launches only)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandInDriver())


def stand_in() -> None:
    """The stand-in driver, and fastmft's launch helpers told that CPU tensors are fine and that
    the device has the H100/H200's SM count (grids sized per SM are then the GPU's)."""
    stand_in_driver()
    from fastmft.kernels import _util

    _util.check_device = lambda op, *tensors: tensors[0].device
    if hasattr(_util, "num_sms"):
        _util.num_sms = lambda device: SMS


# ------------------------------------------------------------------ static mode
def _untouched(shape, dtype) -> torch.Tensor:
    """A CPU tensor whose pages are never written: gigabytes of benchmark input cost no memory."""
    return torch.empty(shape, dtype=dtype)


def bench_calls():
    """(bench, op, mode, size, make, run) for every op of the kernel benchmarks at their full
    sizes: ``run(*make())`` is one call of the op (inputs are built outside what is counted)."""
    from benchmarks import bench_cross_entropy, bench_pooling, bench_typicality

    ops = _ops()
    cuda = torch.device("cuda")  # a device object only: sizes() returns the GPU sizes for it

    for size in bench_typicality.sizes("full", cuda):

        def embeddings(size=size):
            N, D, K, M = size["N"], size["D"], size["K"], size["M"]
            index = torch.zeros(N, dtype=torch.int64)
            x = _untouched((N, D), getattr(torch, size["dtype"]))
            return x, index, index, torch.randn(K, M, 1, D), torch.ones(K, M, 1, dtype=torch.bool)

        yield "typicality", "typicality", "fwd", size, embeddings, lambda *a: ops.typicality(*a, 0.5, 1.0)
        yield (
            "typicality",
            "prototype_sums",
            "fwd",
            size,
            embeddings,
            lambda x, y, d, c, p: ops.prototype_sums(x, y, c.shape[0] * c.shape[1]),
        )

    for size in bench_pooling.sizes("full", cuda):

        def layers(size=size):
            L, B, T, D, dtype = size["L"], size["B"], size["T"], size["D"], getattr(torch, size["dtype"])
            hs = [_untouched((B, T, D), dtype).requires_grad_() for _ in range(L)]
            return hs, torch.ones(B, T, dtype=torch.int64), _untouched((L, B, D), dtype)

        yield "pooling", bench_pooling.OP, "fwd", size, layers, lambda hs, mask, g: ops.masked_mean_pool(hs, mask, True)
        yield (
            "pooling",
            bench_pooling.OP,
            "fwd+bwd",
            size,
            layers,
            lambda hs, mask, g: torch.autograd.backward(ops.masked_mean_pool(hs, mask, True), g),
        )

    for size in bench_cross_entropy.sizes("full", cuda):

        def heads(size=size):
            N, dtype = size["N"], getattr(torch, size["dtype"])
            classes = bench_cross_entropy.CLASSES
            logits = [_untouched((N, c), dtype).requires_grad_() for c in classes]
            targets = [torch.zeros(N, dtype=torch.int64) for _ in classes]
            return logits, targets, _untouched((N,), torch.float32), [1.0] * len(classes), torch.ones(())

        def ce(logits, targets, weights, head_weight, g):
            return ops.multi_head_cross_entropy(logits, targets, weights, head_weight, -100)

        yield "cross_entropy", bench_cross_entropy.OP, "fwd", size, heads, ce
        yield (
            "cross_entropy",
            bench_cross_entropy.OP,
            "fwd+bwd",
            size,
            heads,
            lambda *a: torch.autograd.backward(ce(*a), a[-1]),
        )


# aten ops that launch nothing on a GPU (allocation, views, metadata)
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh"}


class DeviceOps(contextlib.AbstractContextManager):
    """Counts the aten operations of a block that would launch device work (fills, copies,
    arithmetic), excluding allocations and views."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in _NO_LAUNCH and not func.is_view:
                    names.append(name)
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _nvdisasm() -> str:
    try:
        from triton import knobs

        return knobs.nvidia.nvdisasm.path
    except Exception:
        found = shutil.which("nvdisasm") or os.path.join(
            os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvdisasm"
        )
        if not os.path.exists(found):
            raise RuntimeError("nvdisasm not found (Triton ships one; else put the CUDA toolkit's on PATH)") from None
        return found


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        pathlib.Path(path).write_bytes(cubin)
        proc = subprocess.run([_nvdisasm(), "-c", "-gi", path], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nvdisasm failed: {proc.stderr[-2000:]}")
    return proc.stdout


def _scalars(jit, args, kwargs) -> dict:
    """The launch's arguments by name that a loop bound can use: numbers and tuples of numbers."""
    env = {}
    for name, value in [*zip(jit.arg_names, args), *kwargs.items()]:
        if isinstance(value, (int, float)):
            env[name] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, (int, float)) for v in value):
            env[name] = value
    return env


def _tensor_groups(args) -> list[list[torch.Tensor]]:
    return [
        [t for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]
        for a in args
        if isinstance(a, torch.Tensor) or (isinstance(a, tuple) and any(isinstance(t, torch.Tensor) for t in a))
    ]


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor argument covers (a stride-0 dimension counts once)."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return n * t.element_size()


def _programs(grid, kwargs) -> int:
    if callable(grid):
        grid = grid(dict(kwargs))
    return math.prod(tuple(grid) + (1,) * (3 - len(grid)))


class StaticTable:
    """Rows of the static table, one per launch and one per call (see the module docstring)."""

    def __init__(self):
        self.launches: list[dict] = []
        self.calls: list[dict] = []
        self._cache: dict[int, tuple] = {}
        self._current: list[dict] = []

    def _compiled(self, kernel) -> tuple[dict, str]:
        key = id(kernel)
        if key not in self._cache:
            self._cache[key] = (_ptxas_report(kernel.asm["ptx"]), disassemble(kernel.asm["cubin"]), kernel)
        usage, text, _ = self._cache[key]
        return usage, text

    def on_launch(self, jit, kernel, args, kwargs, grid) -> None:
        from benchmarks import sass

        name = jit.fn.__name__
        usage, text = self._compiled(kernel)
        warps = kernel.metadata.num_warps
        shared = kernel.metadata.shared
        per_sm, limiter = sass.occupancy(usage["registers"], shared, warps)
        programs = _programs(grid, kwargs)
        a = sass.analyse(text, sass.SourceLoops(name, _scalars(jit, args, kwargs), programs))
        groups = _tensor_groups(args)
        seen, nbytes = set(), 0
        for t in (t for g in groups for t in g):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                nbytes += _span_bytes(t)
        flagged_only = FLAGGED_ONLY.get(name)
        if flagged_only:
            nbytes = 4  # the int32 count of flagged items, zero at the benchmark inputs
        main = max(groups, key=lambda g: sum(t.numel() for t in g if t.is_floating_point()), default=[])
        elements = sum(t.numel() for t in main)
        rows = main[0].shape[0] if main and main[0].dim() else 1
        warp_instr = a.dynamic * warps * programs
        issue_us = warp_instr / (SMS * ISSUE_PER_CLOCK * CLOCK_HZ) * 1e6
        floor_us = nbytes / COPY_BYTES_PER_S * 1e6
        self._current.append(
            dict(
                kernel=name,
                dtype=_dtype_of(args),
                config={
                    **_config(kwargs),
                    "num_warps": warps,
                    "num_stages": getattr(kernel.metadata, "num_stages", None),
                },
                registers=usage["registers"],
                spill_stores=usage["spill_stores"],
                spill_loads=usage["spill_loads"],
                shared=shared,
                programs_per_sm=per_sm,
                occupancy_limit=limiter,
                programs=programs,
                waves=programs / (per_sm * SMS),
                sass_static=a.static,
                sass_per_program_warp=a.dynamic,
                count_method=f"reads only {flagged_only}: none at these inputs; loop body once (an upper bound)"
                if flagged_only
                else "static, loop body once: " + "; ".join(a.unresolved)
                if a.unresolved
                else "loops x trip counts"
                + (
                    " (" + "; ".join(lp.note for lp in a.loops if lp.note) + ")"
                    if any(lp.note for lp in a.loops)
                    else ""
                ),
                loops=[dict(line=lp.loc[0][1] if lp.loc else None, body=lp.body, trips=lp.trips) for lp in a.loops],
                elements=elements,
                rows=rows,
                sass_per_element=warp_instr * 32 / elements if elements else None,
                sass_per_row=warp_instr * 32 / rows if rows else None,
                widest_load=a.widest_load,
                widest_store=a.widest_store,
                async_loads=a.async_copies,
                barriers_per_program=a.barriers,
                bytes=nbytes,
                issue_us=issue_us,
                memory_floor_us=floor_us,
                bound="issue" if issue_us > floor_us else "memory",
            )
        )

    def run(self, calls) -> list[str]:
        errors = []
        for bench, op, mode, size, make, run in calls:
            self._current = []
            try:
                inputs = make()
                with DeviceOps() as device_ops, torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                    run(*inputs)
                del inputs
            except Exception as e:  # recorded, the others still run; the exit status says it
                errors.append(f"{op} {mode} {size}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print(f"FAILED {errors[-1]}", file=sys.stderr)
                continue
            for row in self._current:
                row.update(bench=bench, op=op, mode=mode, size=size)
            self.launches += self._current
            issue = sum(r["issue_us"] for r in self._current)
            floor = sum(r["memory_floor_us"] for r in self._current)
            self.calls.append(
                dict(
                    bench=bench,
                    op=op,
                    mode=mode,
                    size=size,
                    launches=len(self._current),
                    kernels=[r["kernel"] for r in self._current],
                    other_device_ops=device_ops.names,
                    issue_us=issue,
                    memory_floor_us=floor,
                    estimate_us=sum(max(r["issue_us"], r["memory_floor_us"]) for r in self._current),
                )
            )
            print(f"{op} {mode} {size}: {len(self._current)} launches", file=sys.stderr)
        return errors


def _meta() -> dict:
    import triton

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None

    commit = os.environ.get("FASTMFT_COMMIT") or git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "kernels", "fastmft", "benchmarks"))
    from triton.backends.nvidia import compiler

    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        dirty=dirty,
        triton=triton.__version__,
        torch=torch.__version__,
        ptxas=compiler.get_ptxas_version(90).strip().splitlines()[-1],
        nvdisasm=_nvdisasm(),
        python=platform.python_version(),
        target="sm_90a (H100/H200), compiled without a GPU",
        assumptions=dict(
            sms=SMS,
            warp_instructions_per_clock_per_sm=ISSUE_PER_CLOCK,
            clock_ghz=CLOCK_HZ / 1e9,
            copy_ceiling_tb_per_s=COPY_BYTES_PER_S / 1e12,
        ),
    )


def _size(size: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in size.items())


def markdown(meta: dict, launches: list[dict], calls: list[dict], errors: list[str]) -> str:
    def f(x, nd=1):
        if x is None:
            return "-"
        return f"{x:.2g}" if 0 < abs(x) < 1 and nd else f"{x:,.{nd}f}"

    bits = {0: "-", 8: "8-bit", 16: "16-bit", 32: "32-bit", 64: "64-bit", 128: "128-bit"}
    lines = [
        "# Static cost of the Triton kernels on sm_90 (no GPU)",
        "",
        f"Generated by `python -m benchmarks.kernel_resources --static benchmarks/results/static` on {meta['date']},"
        f" commit {meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''}, Triton {meta['triton']},"
        f" torch {meta['torch']}, {meta['ptxas']}.",
        "Compiled for sm_90a through Triton's own pipeline (stand-in driver, nothing runs) at the sizes of"
        " benchmarks/bench_typicality.py, bench_pooling.py and bench_cross_entropy.py.",
        "",
        "Estimates, not measurements. *SASS/warp*: instructions one warp of one program executes, loops"
        " multiplied by trip counts evaluated from the kernel source at the launch's arguments (both sides"
        " of a branch counted; a loop marked `static, loop body once` could not be resolved). *SASS/elem*:"
        " warp-instructions of the whole launch x 32 / elements of its largest floating-point input."
        f" *Issue*: warp-instructions / ({SMS} SMs x {ISSUE_PER_CLOCK} per clock x {CLOCK_HZ / 1e9:.2f} GHz boost)."
        f" *Floor*: bytes spanned by the tensor arguments, once, / {COPY_BYTES_PER_S / 1e12:.2f} TB/s (the H200's"
        " measured copy ceiling). *Progs/SM*: from registers, shared memory and warps (64K registers,"
        " 228 KB, 64 warps per SM). *Async*: LDGSTS (cp.async) or UTMALDG/UBLKCP (TMA) present.",
        "",
        "## Per call",
        "",
        "| op | mode | size | launches | other device ops | issue µs | floor µs | estimate µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in calls:
        others = ", ".join(c["other_device_ops"]) or "-"
        lines.append(
            f"| {c['op']} | {c['mode']} | {_size(c['size'])} | {c['launches']} | {others} |"
            f" {f(c['issue_us'])} | {f(c['memory_floor_us'])} | {f(c['estimate_us'])} |"
        )
    lines += [
        "",
        "## Per launch",
        "",
        "| op | mode | size | kernel | config | regs | spill B | smem B | progs/SM (limit) | programs | waves |"
        " SASS/warp (static) | SASS/elem | SASS/row | widest LDG / STG | async | BAR/prog | issue µs | floor µs | bound |"
        " loop counting |",
        "|" + "---|" * 21,
    ]
    for r in launches:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(
            f"| {r['op']} | {r['mode']} | {_size(r['size'])} | {r['kernel']} | {cfg} | {r['registers']} |"
            f" {r['spill_stores'] + r['spill_loads']} | {r['shared']} | {r['programs_per_sm']} ({r['occupancy_limit']}) |"
            f" {r['programs']:,} | {f(r['waves'], 2)} | {f(r['sass_per_program_warp'], 0)} ({r['sass_static']}) |"
            f" {f(r['sass_per_element'])} | {f(r['sass_per_row'])} |"
            f" {bits.get(r['widest_load'], r['widest_load'])} / {bits.get(r['widest_store'], r['widest_store'])} |"
            f" {', '.join(r['async_loads']) or 'no'} | {f(r['barriers_per_program'], 0)} | {f(r['issue_us'])} |"
            f" {f(r['memory_floor_us'])} | {r['bound']} | {r['count_method']} |"
        )
    if errors:
        lines += ["", "## Failed calls", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def static(out_dir: str) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    # A private cache: a kernel compiled from another checkout carries that checkout's source
    # paths in its line information, which the loop trip counts read.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        stand_in()
        table = StaticTable()
        with intercept(True, table.on_launch):
            errors = table.run(bench_calls())
    meta = _meta()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sm90.json").write_text(
        json.dumps(dict(meta=meta, calls=table.calls, launches=table.launches, errors=errors), indent=1) + "\n"
    )
    (out / "sm90.md").write_text(markdown(meta, table.launches, table.calls, errors))
    spilled = [r for r in table.launches if r["spill_stores"] or r["spill_loads"]]
    print(
        f"{len(table.launches)} launches in {len(table.calls)} calls, {len(spilled)} with spills, "
        f"{len(errors)} failed calls -> {out / 'sm90.md'}",
        file=sys.stderr,
    )
    return 1 if spilled or errors or not table.launches else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compile-only", action="store_true", help="no GPU: compile for sm_90 and ask ptxas")
    mode.add_argument("--static", metavar="DIR", help="no GPU: the static table at the benchmark sizes into DIR")
    parser.add_argument("--out", help="also append the rows (JSON lines) here, each as soon as it is known")
    args = parser.parse_args(argv)
    if args.static:
        return static(args.static)
    if args.compile_only:
        os.environ.pop("TRITON_INTERPRET", None)
    rows = collect(args.compile_only, args.out)
    print("\n".join(json.dumps(r) for r in rows))
    spilled = [r for r in rows if r["spill_stores"]]
    print(f"{len(rows)} kernel configurations, {len(spilled)} with spills", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
