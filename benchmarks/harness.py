"""The one benchmark harness: the Case record, timing, peak memory, ceilings and result rows.

A benchmark module ``benchmarks/bench_<name>.py`` defines ``cases(scale, device)`` yielding, per
comparison, a list of :class:`Case` objects (``scale`` is ``"quick"`` or ``"full"``);
``python -m benchmarks.run`` discovers the modules, measures the device's ceilings
(:func:`ceiling_cases`), times each yielded group with :func:`time_group` and appends its rows
(see :data:`ROW_FIELDS`) to the results file before asking the module for the next group. See
benchmarks/README.md for the conventions.

Timing (both devices: warm-up first, then one sample per repetition, median and 20/80 % quantiles;
the cases of one group, the providers and modes of one comparison, are timed interleaved
round-robin so that load changes on a shared machine hit them alike):
- CUDA: CUDA events around each call, the method of ``triton.testing.do_bench``, written out here
  because a Case may have an untimed ``setup`` to run before each repetition, which do_bench has no
  slot for. One difference: L2 is flushed by READING a 256 MiB buffer before every repetition
  (do_bench zeroes it, which leaves dirty lines whose write-back lands inside the timed interval).
- Small ops (``Case.launch_profile``, CUDA only): the kernel time of one call (the profiler's device
  activity, summed), the host time per call (no synchronisation) and the time per replay of a CUDA
  graph of the call (the floor once launch overhead is gone).
- CPU: a ``time.perf_counter`` loop (pytest-benchmark's method without the pytest fixture: the
  runner is a plain command, and the rows must carry our own fields). Caches are not flushed on
  CPU; rotate inputs with :func:`rotating` so that a working set smaller than the last-level cache
  does not flatter.

Peak memory (``peak_mem_bytes``: the most memory the call held above what was allocated before
it, inputs excluded, outputs included), measured in one extra untimed call:
- CUDA: ``torch.cuda.max_memory_allocated`` (caching allocator, exact).
- CPU: the torch profiler's memory events (``profile_memory=True``): allocations and frees of the
  torch CPU allocator, replayed in order; exact for torch tensors, blind to memory that is not a
  torch tensor (numpy arrays, e.g. inside the Triton interpreter). ``null`` if the profiler fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed results (--record)
# A plain run writes here instead (runs/ is gitignored), so trying the suite leaves the tree clean.
LOCAL_RESULTS_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench"
RESULTS_FILE = "results.jsonl"


def results_dir_arg(parser) -> None:
    """--results-dir / --record, shared by benchmarks.run, benchmarks.plot and bench_score."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--results-dir",
        help=f"results folder (default {LOCAL_RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent)}/, untracked)",
    )
    group.add_argument(
        "--record",
        action="store_true",
        help=f"use the committed results in {RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent)}/ instead",
    )


def chosen_results_dir(args) -> Path:
    return RESULTS_DIR if args.record else Path(args.results_dir) if args.results_dir else LOCAL_RESULTS_DIR


# Provider names used across the benchmarks (a module may add peers: "liger", "sentence-transformers", ...).
FASTMFT = "fastmft"  # the library's own implementation (fused on CUDA through dispatch)
EAGER = "torch-eager"  # the PyTorch reference, eager
COMPILED = "torch-compile"  # the PyTorch reference under torch.compile
TRITON = "fastmft-triton"  # a fused Triton kernel, called directly


def kernel_providers(scale: str, device) -> list[str]:
    """Providers of a Triton-kernel benchmark: the eager reference everywhere; the kernel and the
    compiled reference on CUDA; the kernel also in a quick run under the Triton interpreter
    (sanity rows, marked interpreted: not performance data)."""
    out = [EAGER]
    if device.type == "cuda":
        out += [TRITON, COMPILED]
    elif scale == "quick" and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(TRITON)
    return out


def kernel_op(provider: str, name: str, compile_target: Callable | None = None) -> Callable:
    """Op ``name`` as a kernel benchmark's provider runs it: the Triton op of fastmft.ops.triton,
    the reference of fastmft.ops.reference, or ``compile_target`` (default: that reference) under
    torch.compile."""
    from fastmft.ops import reference

    if provider == TRITON:
        from fastmft.ops import triton as triton_ops

        return getattr(triton_ops, name)
    if provider == COMPILED:
        return torch.compile(compile_target or getattr(reference, name))
    return getattr(reference, name)


# A/B against an earlier version of a kernel file in the same run: FASTMFT_AB_KERNELS names a folder
# holding ``<name>.py`` copies of kernels/<name>.py from FASTMFT_AB_REF (benchmarks/gpu_session.sh
# prepare writes them with AB_REF=<commit>).
AB_KERNELS_ENV, AB_REF_ENV = "FASTMFT_AB_KERNELS", "FASTMFT_AB_REF"
# The attribute of fastmft.ops.triton through which the ops call each kernel file.
KERNEL_ATTRS = {"pooling": "_pool", "typicality": "_typ", "cross_entropy": "_ce"}


def ab_kernel(name: str):
    """The earlier kernels/<name>.py of an A/B run, loaded as ``fastmft.kernels._ab_<name>`` (so its
    relative imports find today's helpers), or None when no A/B copy is given."""
    folder = os.environ.get(AB_KERNELS_ENV)
    path = Path(folder) / f"{name}.py" if folder else None
    if path is None or not path.is_file():
        return None
    import importlib.util

    import fastmft.kernels  # noqa: F401  (the parent package of the copy)

    spec = importlib.util.spec_from_file_location(f"fastmft.kernels._ab_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ab_cases(cases: Sequence[Case], name: str) -> list[Case]:
    """For an A/B run: copies of the Triton provider's ``cases`` that run with the earlier
    kernels/<name>.py swapped in for the whole call (forward and backward), provider
    ``triton@<ref>``; [] when no A/B copy is given. The copies share the cases' inputs."""
    module = ab_kernel(name)
    if module is None:
        return []
    from fastmft.ops import triton as triton_ops

    attr = KERNEL_ATTRS[name]
    provider = f"triton@{os.environ.get(AB_REF_ENV, 'ab')[:10]}"

    def swapped(fn):
        def call():
            current = getattr(triton_ops, attr)
            setattr(triton_ops, attr, module)
            try:
                return fn()
            finally:
                setattr(triton_ops, attr, current)

        return call

    return [
        dataclasses.replace(c, provider=provider, fn=swapped(c.fn), size=dict(c.size))
        for c in cases
        if c.provider == TRITON
    ]


SCALES = ("quick", "full")


@dataclass
class Case:
    """One timed call. ``fn`` is timed with its inputs already built; ``bytes`` and ``flops`` are
    the minimum the op must move / compute (for GB/s, FLOP/s and % of ceiling; 0 = not
    applicable); ``setup`` runs untimed before each repetition (e.g. zeroing grads); ``items`` is
    the number of examples / rows one call processes (for examples/s; 0 = not applicable);
    ``launch_profile`` asks for the small-op measurements (kernel time, host time per call, CUDA-graph
    replay floor; CUDA only).

    A benchmark module yields the cases of one comparison (every provider and mode of one size) as
    ONE list: the runner times that group and writes its rows before it asks the module for more,
    so nothing the module does next (building the next size's inputs) can reach a case in flight."""

    op: str
    provider: str
    mode: str
    size: dict
    fn: Callable[[], object]
    bytes: int = 0
    flops: int = 0
    setup: Callable[[], None] | None = None
    items: int = 0
    launch_profile: bool = False


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    samples_ms: list[float] = field(repr=False, default_factory=list)


@dataclass(frozen=True)
class Budget:
    """How long to warm up and measure one case."""

    warmup_s: float
    measure_s: float
    min_reps: int
    max_reps: int
    min_warmup: int = 1


BUDGETS = {
    ("quick", "cpu"): Budget(warmup_s=0.02, measure_s=0.15, min_reps=3, max_reps=50),
    ("full", "cpu"): Budget(warmup_s=0.2, measure_s=1.0, min_reps=5, max_reps=500, min_warmup=2),
    ("quick", "cuda"): Budget(warmup_s=0.01, measure_s=0.05, min_reps=5, max_reps=100, min_warmup=2),
    ("full", "cuda"): Budget(warmup_s=0.025, measure_s=0.1, min_reps=10, max_reps=1000, min_warmup=3),
}


def forward_backward_cases(
    op: str,
    provider: str,
    size: dict,
    inputs: Sequence[torch.Tensor],
    call: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    *,
    fwd_bytes: int,
    fwd_bwd_bytes: int,
    items: int,
    grad: torch.Tensor | None = None,
    launch_profile: bool = False,
) -> list[Case]:
    """A ``fwd`` case (``call(inputs)`` without autograd) and a ``fwd+bwd`` case (``call`` on leaf
    copies of ``inputs``, then ``backward(grad)``; their grads are reset untimed before each call)."""

    def fwd():
        with torch.no_grad():
            return call(inputs)

    fwd_case = Case(op, provider, "fwd", dict(size), fwd, bytes=fwd_bytes, items=items, launch_profile=launch_profile)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]

    def setup():
        for x in leaves:
            x.grad = None

    def fwd_bwd():
        call(leaves).backward(grad)

    bwd_case = Case(
        op,
        provider,
        "fwd+bwd",
        dict(size),
        fwd_bwd,
        bytes=fwd_bwd_bytes,
        setup=setup,
        items=items,
        launch_profile=launch_profile,
    )
    return [fwd_case, bwd_case]


def case_groups(produced: Iterable[Case | Sequence[Case]]) -> Iterable[list[Case]]:
    """The groups a module's ``cases()`` yields: a list of cases is one group (timed interleaved), a
    bare Case a group of its own. Lazily: the module resumes only when the next group is asked for."""
    for item in produced:
        yield [item] if isinstance(item, Case) else list(item)


def flat_cases(produced: Iterable[Case | Sequence[Case]]) -> list[Case]:
    """Every case of a module's ``cases()``, flattened (tests, listings)."""
    return [c for group in case_groups(produced) for c in group]


def budget_for(scale: str, device: torch.device) -> Budget:
    return BUDGETS[(scale, "cuda" if device.type == "cuda" else "cpu")]


# Every row written to results.jsonl has exactly these keys (null where not applicable).
ROW_FIELDS = (
    "run_id",
    "kind",  # "case" | "ceiling"
    "status",  # "ok" | "error"
    "error",
    "invalid",  # null, or why the row must not be read as a measurement (set when a bad row is found later)
    "module",
    "op",
    "provider",
    "mode",
    "size",
    "size_label",
    "case_index",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "reps",
    "peak_mem_bytes",
    "mem_method",
    "device_launches",  # kernels, memsets and copies of one call (CUDA profiler); null on CPU
    "kernel_ms",  # launch_profile cases, CUDA: device time of one call's kernels, memsets, copies (profiler)
    "host_ms",  # launch_profile cases, CUDA: host time of one call, not synchronised (median)
    "graph_ms",  # launch_profile cases, CUDA: time per replay of a CUDA graph of one call (median)
    "launch_note",  # how those three were measured, or why they are null
    "bytes",
    "flops",
    "items",
    "gbps",
    "tflops",
    "items_per_s",
    "ceiling_gbps",
    "ceiling_read_gbps",
    "ceiling_tflops",
    "pct_copy_bw",
    "pct_read_bw",
    "pct_matmul",
    "pct_ceiling",
    "speedup_vs",
    "loadavg",  # 1-minute load average when the case was measured (other processes disturb CPU timings)
    "device",
    "device_name",
    "timing_method",
    "interpreted",
    "torch",
    "triton",
    "transformers",
    "python",
    "date",
    "commit",
    "dirty",
    "diff_sha256",  # sha256 of `git diff --binary HEAD` when dirty: which uncommitted changes ran
    "scale",
    "host",
)


# --------------------------------------------------------------------------------------------
# Input rotation


def cache_bytes(device: torch.device) -> int:
    """The last-level cache in bytes: the GPU's L2, or the CPU's L3 (L2 if there is none); 32 MiB
    when it cannot be read."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        value = int(text.rstrip("KMG")) * mult
        if level >= 2:
            best = max(best, value)
    return best or 32 << 20


def copies_needed(
    nbytes: int, device: torch.device, *, max_copies: int = 32, max_total_bytes: int | None = None
) -> int:
    """How many copies of an input set of ``nbytes`` to rotate through so that the set in use was
    evicted from the last-level cache since it was last touched: enough to cover twice the cache,
    at least 1, at most ``max_copies``, and within ``max_total_bytes`` (default 2 GiB on CUDA,
    512 MiB on CPU)."""
    if max_total_bytes is None:
        max_total_bytes = (2 << 30) if device.type == "cuda" else (512 << 20)
    nbytes = max(int(nbytes), 1)
    want = math.ceil(2 * cache_bytes(device) / nbytes) + 1
    return max(1, min(want, max_copies, max_total_bytes // nbytes))


def rotating(inputs: Sequence[T], fn: Callable[[T], object]) -> Callable[[], object]:
    """A zero-argument callable that calls ``fn(inputs[i])`` with i cycling through ``inputs``, so
    that successive repetitions read different copies of the data. Build ``inputs`` with
    ``[make() for _ in range(copies_needed(nbytes, device))]``, or use :func:`rotated`."""
    items = list(inputs)
    if not items:
        raise ValueError("rotating() needs at least one input set")
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(items)
        return fn(items[i])

    call.copies = len(items)  # type: ignore[attr-defined]
    return call


def rotated(
    make: Callable[[int], T], fn: Callable[[T], object], *, nbytes: int, device: torch.device, max_copies: int = 32
) -> Callable[[], object]:
    """``rotating([make(i) for i in range(copies_needed(nbytes, device))], fn)``: ``make(i)``
    builds the i-th input set (``nbytes`` each, the bytes the op reads)."""
    n = copies_needed(nbytes, device, max_copies=max_copies)
    return rotating([make(i) for i in range(n)], fn)


# --------------------------------------------------------------------------------------------
# Timing


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return statistics.median(xs), q[1], q[7]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(case: Case, device: torch.device) -> float:
    """Seconds of one synchronised call of the case (its setup untimed)."""
    if case.setup is not None:
        case.setup()
    _sync(device)
    t0 = time.perf_counter()
    case.fn()
    _sync(device)
    return time.perf_counter() - t0


def _warmup(case: Case, device: torch.device, budget: Budget) -> float:
    """Run the case until the warm-up budget is spent; returns the estimated seconds per call
    (the median of the warm-up calls after the first, which may include compilation)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 1000:
        times.append(_timed_call(case, device))
        if len(times) >= budget.min_warmup and time.perf_counter() - start >= budget.warmup_s:
            break
    if len(times) == 1:  # one slow first call: time one more to keep compilation out of the estimate
        times.append(_timed_call(case, device))
    return statistics.median(times[1:])


def _reps(per_call_s: float, budget: Budget) -> int:
    if per_call_s <= 0:
        return budget.max_reps
    return int(max(budget.min_reps, min(budget.max_reps, budget.measure_s / per_call_s)))


FLUSH_BYTES = 256 << 20  # more than the L2 of any GPU we time on (H200: 60 MiB)


def l2_flush(buffer: torch.Tensor, sink: torch.Tensor) -> None:
    """Evict the L2 cache by READING ``buffer`` (a sum into the scalar ``sink``). Zeroing it, as
    do_bench does, would leave dirty lines whose write-back lands inside the next timed interval."""
    torch.sum(buffer, dim=0, out=sink)


class HostTimer:
    """CPU: ``time.perf_counter`` around the call (the call is synchronous; caches are not flushed)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sample(self, fn: Callable[[], object]):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def finish(self, samples: list) -> list[float]:
        return list(samples)


class EventTimer:
    """CUDA: events recorded around the call on the current stream, L2 flushed (by a read) before
    each; the times are read once, after one synchronisation. ``event`` and ``synchronize`` are
    torch.cuda's unless given (tests pass stand-ins to run this path on CPU)."""

    def __init__(
        self,
        device: torch.device,
        *,
        event: Callable[[], object] | None = None,
        synchronize: Callable[[], None] | None = None,
        flush_bytes: int = FLUSH_BYTES,
    ):
        self.device = device
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.synchronize = synchronize or (lambda: torch.cuda.synchronize(device))
        self.flush_buffer = torch.zeros(flush_bytes // 4, dtype=torch.float32, device=device)
        self.sink = torch.zeros((), dtype=torch.float32, device=device)
        self.synchronize()

    def sample(self, fn: Callable[[], object]):
        l2_flush(self.flush_buffer, self.sink)
        start, end = self.event(), self.event()
        start.record()
        fn()
        end.record()
        return start, end

    def finish(self, samples: list) -> list[float]:
        self.synchronize()
        return [start.elapsed_time(end) for start, end in samples]


_EVENT_TIMERS: dict[torch.device, EventTimer] = {}


def timer_for(device: torch.device) -> HostTimer | EventTimer:
    if device.type != "cuda":
        return HostTimer(device)
    if device not in _EVENT_TIMERS:  # one flush buffer per device, kept for the run
        _EVENT_TIMERS[device] = EventTimer(device)
    return _EVENT_TIMERS[device]


def time_group(
    cases: Sequence[Case], device: torch.device, budget: Budget, timer: HostTimer | EventTimer | None = None
) -> list[Timing | BaseException]:
    """Time several cases interleaved: each is warmed up, then the repetitions run round-robin
    (case 0, case 1, ..., case 0, ...), so that a load change on a shared machine hits every
    provider of a comparison alike. Each case gets its own repetition count from its warm-up
    estimate. Returns a Timing per case, or the exception that case raised (the others go on)."""
    timer = timer or timer_for(device)
    out: list[Timing | BaseException | None] = [None] * len(cases)
    reps: dict[int, int] = {}
    for i, case in enumerate(cases):
        try:
            reps[i] = _reps(_warmup(case, device, budget), budget)
        except Exception as exc:
            out[i] = exc
    samples: dict[int, list] = {i: [] for i in reps}
    active = list(reps)
    while active:
        for i in list(active):
            case = cases[i]
            try:
                if case.setup is not None:
                    case.setup()
                samples[i].append(timer.sample(case.fn))
            except Exception as exc:
                out[i] = exc
                active.remove(i)
                continue
            if len(samples[i]) >= reps[i]:
                active.remove(i)
    for i, got in samples.items():
        if out[i] is not None:
            continue
        ms = timer.finish(got)
        med, q20, q80 = _quantiles(ms)
        out[i] = Timing(med, q20, q80, len(ms), ms)
    return out  # type: ignore[return-value]


def time_case(case: Case, device: torch.device, budget: Budget) -> Timing:
    """Time one case (see :func:`time_group`); raises what the case raises."""
    result = time_group([case], device, budget)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def timing_method(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "CUDA events (do_bench method: warm-up, L2 flushed by a 256 MiB read per rep), providers interleaved, "
            "median/q20/q80"
        )
    return "perf_counter loop (warm-up), providers interleaved, median/q20/q80"


# --------------------------------------------------------------------------------------------
# Peak memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to fd 2)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(case: Case, device: torch.device) -> tuple[int | None, str]:
    """(peak bytes above the allocation level before the call, method); (None, reason) on failure."""
    if case.setup is not None:
        case.setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = case.fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return max(int(peak), 0), "torch.cuda.max_memory_allocated"
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = case.fn()
                del out
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        ]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += int(e.nbytes())
            peak = max(peak, cur)
        return peak, "torch.profiler CPU allocator events"
    except Exception as exc:  # the profiler's private API may change: degrade to null
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def device_activity(events: Iterable) -> tuple[int, float]:
    """(operations, milliseconds) of the device activity among profiler events (kernels, memsets
    and copies: the events whose device type is CUDA), from their ``device_type()`` and
    ``duration_ns()``."""
    durations = [int(e.duration_ns()) for e in events if str(e.device_type()).endswith("CUDA")]
    return len(durations), sum(durations) / 1e6


def profile_device(case: Case, device: torch.device) -> tuple[int | None, float | None]:
    """(device operations, their summed device time in ms) of one untimed call, from the profiler's
    CUDA activity: what bounds launch-bound ops such as the MFT-sized cross-entropy. (None, None) on
    CPU, or when the profiler fails (its private API may change)."""
    if device.type != "cuda":
        return None, None
    try:
        from torch.profiler import ProfilerActivity, profile

        if case.setup is not None:
            case.setup()
        torch.cuda.synchronize(device)
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out = case.fn()
                torch.cuda.synchronize(device)
                del out
        return device_activity(prof.profiler.kineto_results.events())
    except Exception:
        return None, None


def host_time_ms(case: Case, device: torch.device, reps: int = 20) -> float:
    """Median host time of one call, NOT synchronised after it (the device queue is drained before
    each): what the host spends issuing the call, the bound of a launch-bound op."""
    times = []
    for _ in range(reps):
        if case.setup is not None:
            case.setup()
        _sync(device)
        t0 = time.perf_counter()
        case.fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def graph_replay_ms(case: Case, device: torch.device, reps: int = 50) -> float:
    """Time per replay of a CUDA graph holding one call (captured after warm-up on a side stream,
    setup run once before the capture): the floor of the call once launch overhead is gone. No L2
    flush between replays. Raises what the capture raises."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            if case.setup is not None:
                case.setup()
            case.fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    if case.setup is not None:
        case.setup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps


def launch_profile(case: Case, device: torch.device) -> dict:
    """The small-op fields of a row: host time per call on every device; the CUDA-graph replay floor
    on CUDA (kernel time comes with :func:`profile_device`). A failure leaves its field null and
    says why in ``launch_note``."""
    out = dict(host_ms=None, graph_ms=None, launch_note=None)
    notes = ["host_ms: median of 20 unsynchronised calls"]
    try:
        out["host_ms"] = host_time_ms(case, device)
    except Exception as exc:
        notes = [f"host_ms failed ({type(exc).__name__}: {exc})"]
    if device.type == "cuda":
        try:
            out["graph_ms"] = graph_replay_ms(case, device)
            notes.append("graph_ms: mean of 50 CUDA-graph replays, no L2 flush")
        except Exception as exc:
            notes.append(f"graph_ms: capture failed ({type(exc).__name__}: {str(exc)[:200]})")
        notes.append("kernel_ms: profiler, one call")
    else:
        notes.append("kernel_ms, graph_ms: CUDA only")
    out["launch_note"] = "; ".join(notes)
    return out


# --------------------------------------------------------------------------------------------
# Ceilings


def _read_ceiling_case(source: torch.Tensor) -> Case:
    """A read-only pass over the copy's source buffer, read as float32 (no second allocation)."""
    data = source.view(torch.float32)
    sink = torch.empty((), dtype=torch.float32, device=source.device)
    nbytes = data.numel() * 4
    return Case(
        "ceiling:read", "torch", "sum", {"bytes": nbytes}, lambda: torch.sum(data, dim=0, out=sink), bytes=nbytes
    )


# The keys of the run's ceilings, by ceiling op.
CEILING_KEYS = {"ceiling:copy": "copy_gbps", "ceiling:read": "read_gbps", "ceiling:matmul": "matmul_tflops"}


def ceiling_cases(scale: str, device: torch.device) -> list[tuple[str, Case]]:
    """The device's own ceilings, measured in every run: ("copy", case) with bytes = read + write,
    ("read", case) a read-only pass (a sum over the copy's source read as float32; bytes = read: the
    roof of ops that read much and write little, which can exceed the copy ceiling),
    and ("matmul", case) with flops = 2 M N K (bf16 on CUDA, fp32 on CPU). The runner measures
    them at the start and at the end of the run and takes the best rate (from the 20 % quantile
    of the time): a ceiling is what the device can do, not what it did while busy."""
    out: list[tuple[str, Case]] = []
    if device.type == "cuda":
        n = (256 << 20) if scale == "quick" else (1 << 30)  # bytes per buffer
        src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        out.append(
            ("copy", Case("ceiling:copy", "torch", "d2d-copy", {"bytes": n}, lambda: dst.copy_(src), bytes=2 * n))
        )
        out.append(("read", _read_ceiling_case(src)))
        m = 4096 if scale == "quick" else 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        c = torch.empty(m, m, device=device, dtype=torch.bfloat16)
        out.append(
            (
                "matmul",
                Case(
                    "ceiling:matmul",
                    "torch",
                    "bf16-matmul",
                    {"M": m, "N": m, "K": m},
                    lambda: torch.mm(a, b, out=c),
                    flops=2 * m**3,
                ),
            )
        )
    else:
        n = max(64 << 20, 4 * cache_bytes(device)) if scale == "quick" else max(256 << 20, 8 * cache_bytes(device))
        src = torch.empty(n // 4, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        out.append(("copy", Case("ceiling:copy", "torch", "memcpy", {"bytes": n}, lambda: dst.copy_(src), bytes=2 * n)))
        out.append(("read", _read_ceiling_case(src)))
        m = 1024 if scale == "quick" else 2048
        a = torch.randn(m, m)
        b = torch.randn(m, m)
        c = torch.empty(m, m)
        out.append(
            (
                "matmul",
                Case(
                    "ceiling:matmul",
                    "torch",
                    "fp32-matmul",
                    {"M": m, "N": m, "K": m},
                    lambda: torch.mm(a, b, out=c),
                    flops=2 * m**3,
                ),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Environment and rows


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def source_state(directory: Path | str | None = None) -> dict:
    """What ran: ``commit`` (FASTMFT_COMMIT, else ``git rev-parse HEAD``), ``dirty`` (tracked files
    differ from it) and ``diff_sha256``, the sha256 of ``git diff --binary HEAD`` when dirty, so that
    a row taken from uncommitted changes can be matched to them (keep the patch: ``git diff
    --binary HEAD | sha256sum`` gives the same hash). Without git (a copied tree): FASTMFT_DIFF_SHA256
    if set, dirty unknown (null)."""
    cwd = Path(directory) if directory is not None else Path(__file__).resolve().parent
    commit = os.environ.get("FASTMFT_COMMIT") or _git("rev-parse", "HEAD", cwd=cwd)
    try:
        res = subprocess.run(["git", "diff", "--binary", "HEAD"], cwd=cwd, capture_output=True, timeout=30)
        diff = res.stdout if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        diff = None
    if diff is None:
        return dict(commit=commit, dirty=None, diff_sha256=os.environ.get("FASTMFT_DIFF_SHA256") or None)
    return dict(commit=commit, dirty=bool(diff), diff_sha256=hashlib.sha256(diff).hexdigest() if diff else None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'' if n == 1 else 's'})"


def versions() -> dict:
    """Python, library versions and what ran (``source_state``): the provenance every benchmark row
    and every experiment cell records."""
    found = {}
    for name in ("triton", "transformers", "fastmft"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
            found[name] = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **found,
        **source_state(),
    }


def environment(device: torch.device, scale: str) -> dict:
    """The fields every row of a run shares."""
    v = versions()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "timing_method": timing_method(device),
        "interpreted": device.type != "cuda"
        and os.environ.get("TRITON_INTERPRET", "0") == "1",  # per row: triton providers only
        **{k: v[k] for k in ("torch", "triton", "transformers", "python")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v[k] for k in ("commit", "dirty", "diff_sha256")},
        "scale": scale,
        "host": platform.node(),
    }


def size_label(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def size_key(size: dict) -> str:
    return json.dumps(size, sort_keys=True, default=str)


def make_row(env: dict, run_id: str, module: str, case: Case, index: int, kind: str = "case") -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(env)
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    row.update(
        run_id=run_id,
        kind=kind,
        loadavg=load,
        status="ok",
        module=module,
        op=case.op,
        provider=case.provider,
        mode=case.mode,
        size=dict(case.size),
        size_label=size_label(case.size),
        case_index=index,
        bytes=int(case.bytes) or None,
        flops=int(case.flops) or None,
        items=int(case.items) or None,
        speedup_vs={},
        # Triton kernels run through the interpreter on CPU: sanity only, not performance data.
        interpreted=bool(env.get("interpreted")) and "triton" in case.provider.lower(),
    )
    return row


def ceiling_rate(row: dict) -> float | None:
    """The rate a ceiling row stands for: GB/s (copy, read) or TFLOP/s (matmul) at its q20 time."""
    if row["status"] != "ok" or not row["q20_ms"]:
        return None
    sec = row["q20_ms"] / 1e3
    return row["bytes"] / sec / 1e9 if row["bytes"] else row["flops"] / sec / 1e12


def fill_rates(row: dict, timing: Timing | None, ceilings: dict[str, float]) -> None:
    """Time-derived fields of one row: GB/s, TFLOP/s, items/s and % of the run's ceilings."""
    row["ceiling_gbps"] = ceilings.get("copy_gbps")
    row["ceiling_read_gbps"] = ceilings.get("read_gbps")
    row["ceiling_tflops"] = ceilings.get("matmul_tflops")
    if timing is None:
        return
    row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, reps=timing.reps)
    sec = timing.median_ms / 1e3
    if sec <= 0:
        return
    pcts = []
    if row["bytes"]:
        row["gbps"] = row["bytes"] / sec / 1e9
        if row["ceiling_gbps"]:
            row["pct_copy_bw"] = 100.0 * row["gbps"] / row["ceiling_gbps"]
            pcts.append(row["pct_copy_bw"])
        if row["ceiling_read_gbps"]:  # beside % of copy: a read-mostly op's own roof
            row["pct_read_bw"] = 100.0 * row["gbps"] / row["ceiling_read_gbps"]
    if row["flops"]:
        row["tflops"] = row["flops"] / sec / 1e12
        if row["ceiling_tflops"]:
            row["pct_matmul"] = 100.0 * row["tflops"] / row["ceiling_tflops"]
            pcts.append(row["pct_matmul"])
    if row["items"]:
        row["items_per_s"] = row["items"] / sec
    # The binding roof: whichever of bandwidth and compute the op gets closer to.
    row["pct_ceiling"] = max(pcts) if pcts else None


def fill_speedups(rows: list[dict]) -> None:
    """speedup_vs[p] = median(p) / median(this) for every other provider p of the same
    (op, mode, size) in the same run: > 1 means this row is faster than p."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "case" and r["status"] == "ok" and r["median_ms"]:
            groups.setdefault((r["run_id"], r["op"], r["mode"], size_key(r["size"])), []).append(r)
    for group in groups.values():
        for r in group:
            r["speedup_vs"] = {o["provider"]: o["median_ms"] / r["median_ms"] for o in group if o is not r}


def append_rows(rows: Iterable[dict], results_dir: Path | str = LOCAL_RESULTS_DIR) -> Path:
    """Append rows as JSON lines, in one locked write (several runs may share the file)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / RESULTS_FILE
    data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


def read_rows(results_dir: Path | str = LOCAL_RESULTS_DIR) -> list[dict]:
    path = Path(results_dir) / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows
