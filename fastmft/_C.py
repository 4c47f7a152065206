"""fastmft._C: the compiled extension (sources in csrc/), built just in time and cached.

``pip install -e .`` (or a wheel) installs no binary: the first call that needs the extension
(``fastmft.inner_step`` on CPU tensors under backend ``auto``, or :func:`load`) compiles
csrc/*.cpp with torch.utils.cpp_extension (ninja, the system C++ compiler, OpenMP) into a per-user
cache, keyed by a hash of the sources, the torch and Python versions and the build flags; later
processes load the cached library in milliseconds. Where torch has CUDA and a CUDA toolkit is
found (CUDA_HOME), csrc/*.cu is compiled into the same library. If the build fails (no compiler,
no toolkit, ...), fastmft warns ONCE and every op keeps running on the PyTorch reference (torch's
foreach ops: identical results, slower); a failed CUDA part still leaves the CPU part.

Is the fused path active?  ``fastmft._C.is_available()`` / ``is_available("cuda")``, and
``fastmft._C.status()`` (what was built, where, and why not). ``fastmft.ops.dispatch.which("inner_step",
device)`` says which implementation dispatch picks.

Environment: ``FASTMFT_EXTENSION=0`` never builds or loads it (the reference runs, no warning);
``FASTMFT_CACHE_DIR`` sets the cache folder (default ``$XDG_CACHE_HOME/fastmft`` or
``~/.cache/fastmft``); ``FASTMFT_BUILD_VERBOSE=1`` shows the compiler's output.

The operator lives in ``torch.ops.fastmft_C`` (registered by the library; dispatch by device):
``inner_step_(params, grads, outs, lr, check_finite, modes) -> flag``, a 0-d bool tensor from both the
CPU and the CUDA part; csrc/inner_step.h holds the contract both parts share.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .ops import _checks, dispatch

_LOCK = threading.RLock()
_state: dict = {"tried": False, "cpu": False, "cuda": False, "error": None, "cuda_error": None, "path": None}
_warned = False
_modes: dict[tuple[str, int], list[int]] = {}
_exact: dict[tuple[str, int, torch.dtype], bool] = {}

# dtype codes of csrc/inner_step.h (enum Code: the index into `modes`)
_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
LDFLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3", "-std=c++17"]  # no --use_fast_math: it flushes denormals, torch does not


def _enabled() -> bool:
    return os.environ.get("FASTMFT_EXTENSION", "1").strip().lower() not in ("0", "false", "off", "no")


def sources_dir() -> Path | None:
    """csrc/ next to the package (a checkout or editable install) or inside it (fastmft/csrc in a wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "inner_step.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("FASTMFT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastmft"


def _cuda_wanted() -> tuple[bool, str | None]:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False, "torch has no CUDA device" if torch.version.cuda else "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, None


def _ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's python run by full path has no venv bin on PATH, so
    point PATH at the ninja pip package's binary (a declared dependency) when none is found."""
    import shutil

    if shutil.which("ninja"):
        return
    candidates = [str(Path(sys.executable).parent)]
    try:
        import ninja

        candidates.insert(0, str(ninja.BIN_DIR))
    except Exception:
        pass
    for d in candidates:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _build(with_cuda: bool):
    _ensure_ninja_on_path()

    src = sources_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources of fastmft._C are not installed next to the package")
    sources = sorted(src.glob("*.cpp")) + (sorted(src.glob("*.cu")) if with_cuda else [])
    headers = sorted(src.glob("*.h")) + sorted(src.glob("*.cuh"))
    cflags = CFLAGS + (["-DFASTMFT_WITH_CUDA"] if with_cuda else [])
    h = hashlib.sha256()
    for f in sources + headers:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    # The source folder is part of the key: torch's build.ninja records absolute source paths, so
    # two checkouts sharing one build folder would rebuild over each other (and wait on each
    # other's locks).
    key = repr(
        (
            torch.__version__,
            torch.version.cuda if with_cuda else None,
            sys.version_info[:2],
            platform.machine(),
            cflags,
            LDFLAGS,
            CUDA_FLAGS if with_cuda else None,
            str(src.resolve()),
        )
    )
    h.update(key.encode())
    name = f"fastmft_C_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:16]}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's FileBaton ("lock") is taken by every load, even of a finished build, and a process
    # killed while holding it leaves it behind: later loads would wait for it. fastmft's builders
    # first take an flock, which the kernel drops when its holder dies, so whoever holds the flock
    # knows that a leftover baton is a dead process's.
    lock = build_dir / "lock"
    guard = open(build_dir / "fastmft.flock", "a")
    fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
    try:
        if lock.exists():
            lock.unlink()
        return _load_locked(name, sources, cflags, with_cuda, build_dir)
    finally:
        guard.close()


def _load_locked(name: str, sources: list, cflags: list, with_cuda: bool, build_dir: Path) -> Path:
    from torch.utils import cpp_extension

    verbose = os.environ.get("FASTMFT_BUILD_VERBOSE", "0") == "1"
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")  # torch's compiler-version notes; a failure still raises
            logger.setLevel(logging.ERROR)
        try:
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=cflags,
                extra_ldflags=LDFLAGS,
                extra_cuda_cflags=CUDA_FLAGS if with_cuda else None,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        finally:
            logger.setLevel(level)
    return build_dir


def _reason(exc: BaseException) -> str:
    """One line that says why a build failed: the compiler's first error line if there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        low = line.lower()
        if "error" in low and not low.startswith("error building extension") or "not found" in low:
            return f"{type(exc).__name__}: {line[:300]}"
    return f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _registered() -> bool:
    """Whether the operator is already registered in this process (e.g. loaded by another copy)."""
    try:
        torch.ops.fastmft_C.inner_step_  # noqa: B018 (the lookup raises when it is not registered)
    except (AttributeError, RuntimeError):
        return False
    return True


def load() -> bool:
    """Build (first time) and load the extension; True when its CPU part is usable. Never raises."""
    with _LOCK:
        if _state["tried"]:
            return _state["cpu"]
        _state["tried"] = True
        if not _enabled():
            _state["error"] = "disabled by FASTMFT_EXTENSION=0"
            return False
        if _registered():
            _state["cpu"] = True  # already registered in this process (e.g. by another loader)
            return True
        want_cuda, _state["cuda_error"] = _cuda_wanted()
        attempts = [True, False] if want_cuda else [False]
        for with_cuda in attempts:
            try:
                _state["path"] = str(_build(with_cuda))
            except Exception as exc:  # a missing compiler, a failed compile, a broken cache
                if with_cuda:
                    _state["cuda_error"] = f"CUDA build failed: {_reason(exc)}"
                    continue
                _state["error"] = _reason(exc)
                _warn(
                    "fastmft._C could not be built or loaded, so fastmft.inner_step runs on torch's "
                    f"foreach ops (same results, slower). Reason: {_state['error']} "
                    "(FASTMFT_BUILD_VERBOSE=1 shows the compiler output; FASTMFT_EXTENSION=0 silences this)."
                )
                return False
            _state["cpu"] = True
            _state["cuda"] = with_cuda
            if want_cuda and not with_cuda:
                _warn(
                    f"fastmft._C: the CUDA part was not built ({_state['cuda_error']}); "
                    "CUDA tensors use torch's foreach ops."
                )
            return True
        return False


def is_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled inner step runs for tensors on ``device`` (builds it on first call)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False
    if not load():
        return False
    return device.type == "cpu" or _state["cuda"]


available = is_available


def status() -> dict:
    """What was built and loaded: {'enabled', 'cpu', 'cuda', 'error', 'cuda_error', 'path', 'build_info'}."""
    load()
    info = None
    if _state["cpu"]:
        try:
            info = torch.ops.fastmft_C.build_info()
        except Exception:  # pragma: no cover
            info = None
    return {
        "enabled": _enabled(),
        **{k: _state[k] for k in ("cpu", "cuda", "error", "cuda_error", "path")},
        "build_info": info,
    }


# ------------------------------------------------------------------ exactness against the reference
def _probe(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, float]:
    g = torch.Generator().manual_seed(1234)
    p = torch.randn(4099, generator=g, dtype=torch.float64)
    d = torch.randn(4099, generator=g, dtype=torch.float64) * 7.0
    return p.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype), 0.01234567


def _bits(t: Tensor) -> Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def modes_for(device: torch.device) -> list[int]:
    """Per dtype code, the rounding mode that makes the kernel bitwise equal to torch's foreach add.

    Torch's CPU add rounds differently by build and CPU capability (one fused multiply-add on
    AVX2/AVX512, multiply-round-add on DEFAULT; alpha rounded to float16/bfloat16 first), so it is
    probed once per device: the first mode that reproduces torch._foreach_add bit for bit, else
    the one closest to it. float32/float64 are reproduced exactly. For float16/bfloat16 torch
    itself is not uniform: its vectorised body computes in fp32 with one rounding, its scalar tail
    (the last n % vector-width elements of each tensor) rounds alpha * grad to the dtype before
    adding; the kernel computes every element like the body (fp32 math, one rounding), so it can
    differ from torch by one unit in the last place on a few tail elements.
    """
    key = (device.type, device.index or 0)
    found = _modes.get(key)
    if found is not None:
        return found
    modes = [1, 1, 3, 3]  # defaults: fma; round alpha to the dtype for float16/bfloat16
    for dtype, code in _CODES.items():
        p, g, lr = _probe(dtype, device)
        ref = torch._foreach_add([p], [g], alpha=-lr)[0]
        best = None
        for m in [modes[code]] + [m for m in (1, 3, 0, 2) if m != modes[code]]:
            out = torch.empty_like(p)
            trial = list(modes)
            trial[code] = m
            torch.ops.fastmft_C.inner_step_([p], [g], [out], lr, False, trial)
            wrong = int((_bits(out) != _bits(ref)).sum())
            if best is None or wrong < best[0]:
                best = (wrong, m)
            if wrong == 0:
                break
        modes[code] = best[1]
        exact = best[0] == 0
        _exact[(device.type, device.index or 0, dtype)] = exact
    _modes[key] = modes
    return modes


def is_exact(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool | None:
    """Whether the probe found a mode bitwise equal to torch's foreach add (None: not probed)."""
    device = torch.device(device)
    if is_available(device):
        modes_for(device)
    return _exact.get((device.type, device.index or 0, dtype))


# ------------------------------------------------------------------ the op, as dispatch calls it
def inner_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    outs: Sequence[Tensor],
    lr: float,
    check_finite: bool = False,
) -> Tensor:
    """outs[i] = params[i] - lr * grads[i] (None grad: a copy) in one fused pass; returns the
    non-finite flag (a 0-d bool tensor on the device, meaningful when ``check_finite``)."""
    # Called under no_grad by dispatch; the op has no autograd formula, so no detach is needed.
    return torch.ops.fastmft_C.inner_step_.default(
        params, grads, outs, float(lr), bool(check_finite), modes_for(params[0].device)
    )


def _several_devices(params, *_) -> bool:
    return any(p.device != params[0].device for p in params)


# Parameters spread over several devices are not one fused pass: the reference steps them.
@dispatch.register("inner_step", "compiled", fallbacks=(("parameters on several devices", _several_devices),))
def inner_step(params, grads, lr: float, out, check_finite: bool = False) -> list[Tensor]:
    """The compiled implementation of fastmft.inner_step (the reference's signature and contract); with
    ``check_finite`` the flag computed in the same pass raises fastmft.NonFiniteError."""
    with torch.no_grad():
        if out is None:
            stepped = [i for i, g in enumerate(grads) if g is not None]
            result = [p.detach() for p in params]
            flag = False
            if stepped:
                outs = [torch.empty(params[i].shape, dtype=params[i].dtype, device=params[i].device) for i in stepped]
                flag = inner_step_([params[i] for i in stepped], [grads[i] for i in stepped], outs, lr, check_finite)
                for i, o in zip(stepped, outs):
                    result[i] = o
            # the op saw only the stepped tensors; a parameter with a None grad is a result as well
            unstepped = [p for p, g in zip(params, grads) if g is None]
        else:
            flag = inner_step_(params, grads, out, lr, check_finite)
            result, unstepped = list(out), []
    if check_finite:
        _checks.finite("fastmft.inner_step: theta - lr * grad", unstepped, flag=flag)
    return result
