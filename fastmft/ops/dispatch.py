"""Backend selection and dispatch: the one place that decides which implementation of an op runs.

Every op has a pure-PyTorch reference (``"torch"``, the ground truth and the CPU path) and at most
one fused implementation per device kind: ``"triton"`` for CUDA tensors (or CPU tensors through
the Triton interpreter), and ``"compiled"``, the extension ``fastmft._C`` (C++/OpenMP on CPU, CUDA
on GPU; only the inner step has one). Each backend's module registers its implementations with
:func:`register` when imported; this module imports them itself on first use (``_MODULES``), so
that ``import fastmft`` imports neither torch nor Triton.

An implementation is registered with its fallback rules, as data: (why the reference runs, test
on the op's arguments). They are checked at every call, and the reference runs when one applies.

Selection: the environment variable ``FASTMFT_BACKEND`` (auto | torch | triton, read at each
call) or the context manager :func:`use_backend`, which wins over the variable. ``torch`` always
runs the reference. ``auto`` runs the compiled implementation where the extension is available for
the device, else the Triton one for CUDA tensors, else the reference. ``triton`` runs the Triton
implementation or raises. :func:`which` says which implementation an op gets.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..kernels._util import interpreter

BACKENDS = ("auto", "torch", "triton")

# The module that registers each implementation kind, imported on first use.
_MODULES = {"torch": "fastmft.ops.reference", "triton": "fastmft.ops.triton", "compiled": "fastmft._C"}

FallbackRule = tuple[str, Callable[..., bool]]


@dataclass(frozen=True)
class Implementation:
    """One implementation of ``op``: ``kind`` is "torch", "triton" or "compiled"; ``fallbacks`` are
    the rules (why, test on the op's arguments) under which the reference runs instead of ``fn``."""

    op: str
    kind: str
    fn: Callable
    fallbacks: tuple[FallbackRule, ...] = ()

    def fallback_reason(self, *args) -> str | None:
        """Why the reference runs for these arguments, or None when ``fn`` runs."""
        return next((reason for reason, applies in self.fallbacks if applies(*args)), None)

    def __call__(self, *args):
        if self.fallbacks and self.fallback_reason(*args):
            return _registry[(self.op, "torch")].fn(*args)
        return self.fn(*args)


_registry: dict[tuple[str, str], Implementation] = {}
_loaded: set[str] = set()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastmft_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``$FASTMFT_BACKEND``, else auto."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("FASTMFT_BACKEND", "auto").strip().lower() or "auto", "FASTMFT_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops with backend ``name`` (auto | torch | triton)."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def register(op: str, kind: str, *, fallbacks: tuple[FallbackRule, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``kind`` implementation of ``op`` (returned unchanged),
    behind the ``fallbacks`` rules."""
    if kind not in _MODULES:
        raise ValueError(f"register(kind) must be one of {', '.join(_MODULES)}; got {kind!r}")
    if fallbacks and kind == "torch":
        raise ValueError("the reference is what a fallback runs: it has no fallbacks itself")

    def deco(fn: Callable) -> Callable:
        _registry[(op, kind)] = Implementation(op, kind, fn, tuple(fallbacks))
        return fn

    return deco


def _load(kind: str) -> None:
    if kind not in _loaded:
        _loaded.add(kind)
        importlib.import_module(_MODULES[kind])


def _kind(op: str, device: torch.device) -> str:
    """The kind of implementation ``op`` gets for tensors on ``device`` under the current backend."""
    name = current_backend()
    _load("torch")
    if name == "torch":
        return "torch"
    if name == "auto":
        _load("compiled")
        # The extension is built just in time on first use; a failed build warns once and the next
        # choice runs.
        if (op, "compiled") in _registry and importlib.import_module(_MODULES["compiled"]).is_available(device):
            return "compiled"
        if device.type != "cuda":
            return "torch"
        _load("triton")
        return "triton" if (op, "triton") in _registry else "torch"
    # Explicit triton: fail loudly rather than silently running something else.
    if device.type != "cuda" and not interpreter():
        raise RuntimeError(
            f"fastmft backend 'triton' was asked for {op} on {device.type} tensors: Triton kernels "
            "run on CUDA tensors, or on CPU tensors only through the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported). Use backend 'torch' or 'auto' "
            "for CPU tensors."
        )
    _load("triton")
    if (op, "triton") not in _registry:
        raise NotImplementedError(f"fastmft has no Triton implementation of {op}; use backend 'torch' or 'auto'")
    return "triton"


def check_backend(device: torch.device) -> None:
    """Whether the current backend can run on ``device`` (ValueError naming FASTMFT_BACKEND if not):
    what the commands check before reading any data."""
    name = current_backend()
    if name == "triton" and device.type != "cuda" and not interpreter():
        raise ValueError(
            f"FASTMFT_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported, "
            f"and the device here is {device.type}; use FASTMFT_BACKEND=torch or auto"
        )


def which(op: str, device: torch.device | str) -> str:
    """Which implementation :func:`resolve` picks now: "compiled", "triton" or "torch"."""
    return _kind(op, torch.device(device))


def resolve(op: str, device: torch.device) -> Implementation:
    """The implementation of ``op`` for tensors on ``device`` under the current backend; calling it
    runs the reference instead when one of its fallback rules applies to the arguments."""
    return _registry[(op, _kind(op, device))]


def fallback_reason(op: str, kind: str, *args) -> str | None:
    """Why the ``kind`` implementation of ``op`` runs the reference for these arguments, or None."""
    _load(kind)
    return _registry[(op, kind)].fallback_reason(*args)
