"""Backend selection and dispatch: the one place that decides which implementation of an op runs.

Every op has a pure-PyTorch reference (backend ``"torch"``, the ground truth and the CPU path)
and at most one fused implementation per device kind (``"triton"`` for CUDA tensors, or for CPU
tensors through the Triton interpreter). Fused implementations register themselves with
:func:`register` from modules listed in ``_PROVIDERS``, imported lazily so that
``import fastmft`` never imports Triton.

Selection: the environment variable ``FASTMFT_BACKEND`` (auto | torch | triton, read at each
call) or the context manager :func:`use_backend`, which wins over the variable.
``auto`` runs the fused implementation for CUDA tensors when one is registered, the reference
otherwise. Ops listed in ``_COMPILED_OPS`` (the inner step) also have an implementation in the
compiled extension ``fastmft._C`` (C++/OpenMP on CPU, CUDA on GPU): under ``auto`` it runs for every
device the extension is available for; ``torch`` always runs the reference. :func:`which` says
which implementation an op gets.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Iterator

import torch

from ..kernels._util import interpreter

BACKENDS = ("auto", "torch", "triton")

# Modules that register each backend's implementations when imported; loaded on first resolve,
# so that `import fastmft` imports neither Triton nor anything it does not need.
_PROVIDERS: dict[str, tuple[str, ...]] = {"torch": ("fastmft.ops.reference",), "triton": ("fastmft.ops.triton",)}

# Ops with an implementation in the compiled extension fastmft._C (csrc/: C++/OpenMP on CPU, CUDA
# on GPU), registered by that module with register_compiled. Under "auto" the compiled
# implementation wins for every device the extension is available for (it is built just in time
# on first use; a failed build warns once and the next choice runs); "torch" always runs the
# reference; "triton" never picks it.
_COMPILED_OPS: dict[str, str] = {"inner_step": "fastmft._C"}
_compiled_registry: dict[str, Callable] = {}

_registry: dict[tuple[str, str], Callable] = {}
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


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    _check_name(backend, "register(backend)")

    def deco(fn: Callable) -> Callable:
        _registry[(op, backend)] = fn
        return fn

    return deco


def register_compiled(op: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the compiled-extension implementation of ``op``."""

    def deco(fn: Callable) -> Callable:
        _compiled_registry[op] = fn
        return fn

    return deco


def _compiled(op: str, device: torch.device) -> Callable | None:
    """The compiled implementation of ``op`` if the extension is built and usable on ``device``."""
    module = _COMPILED_OPS.get(op)
    if module is None:
        return None
    ext = importlib.import_module(module)
    if not ext.is_available(device):
        return None
    return _compiled_registry.get(op)


def which(op: str, device: torch.device | str) -> str:
    """Which implementation :func:`resolve` picks now: "compiled", "triton" or "torch"."""
    fn = resolve(op, torch.device(device))
    if fn is _compiled_registry.get(op):
        return "compiled"
    if fn is _registry.get((op, "triton")):
        return "triton"
    return "torch"


def _load_providers(backend: str) -> None:
    if backend in _loaded:
        return
    _loaded.add(backend)
    for module in _PROVIDERS.get(backend, ()):
        importlib.import_module(module)


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device`` under the current backend."""
    name = current_backend()
    _load_providers("torch")
    if name == "torch":
        return _registry[(op, "torch")]
    if name == "auto":
        fn = _compiled(op, device)
        if fn is not None:
            return fn
        if device.type != "cuda":
            return _registry[(op, "torch")]
        _load_providers("triton")
        return _registry.get((op, "triton"), _registry[(op, "torch")])
    # Explicit triton: fail loudly rather than silently running something else.
    if device.type != "cuda" and not interpreter():
        raise RuntimeError(
            f"fastmft backend 'triton' was asked for {op} on {device.type} tensors: Triton kernels "
            "run on CUDA tensors, or on CPU tensors only through the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported). Use backend 'torch' or 'auto' "
            "for CPU tensors."
        )
    _load_providers("triton")
    fn = _registry.get((op, "triton"))
    if fn is None:
        raise NotImplementedError(f"fastmft has no Triton implementation of {op}; use backend 'torch' or 'auto'")
    return fn
