"""Argument checks shared by the public ops: errors name the argument and say what was expected.

They run before any implementation (reference or kernel), so a bad index never reaches a kernel,
where an out-of-bounds read or write would corrupt memory silently. :func:`finite` is the check
of results (``check_finite``) that every implementation and caller raises through.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    return value


def rank(name: str, value: torch.Tensor, *ranks: int, shape_hint: str = "") -> torch.Tensor:
    if value.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must be {want}{hint}, got shape {tuple(value.shape)}")
    return value


def _host_read(values: torch.Tensor) -> list:
    """The checks' only device-to-host copy (one stream sync on CUDA); tests count its calls."""
    return values.tolist()


def index_tensor(name: str, value, n: int | None) -> torch.Tensor:
    """An integer tensor of shape [n] (its values unchecked)."""
    tensor(name, value)
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    rank(name, value, 1)
    if n is not None and value.shape[0] != n:
        raise ValueError(f"{name} has {value.shape[0]} entries, expected {n}")
    return value


def indices(*specs: tuple[str, torch.Tensor, int | None, int, int | None]) -> None:
    """Check several index tensors, each spec (name, tensor, n, upper, ignore_index), with one
    fused min/max reduction and a single host read for all of them: a range check must read the
    values on the host, and each read stalls a CUDA stream, so a training step pays for one."""
    bounds, checked = [], []
    for name, value, n, upper, ignore_index in specs:
        index_tensor(name, value, n)
        if value.numel() == 0:
            continue
        v = value.long()
        if ignore_index is not None:
            # Ignored entries become 0, inside every range; a tensor of only ignored rows passes.
            v = torch.where(v == ignore_index, 0, v)
        lo, hi = torch.aminmax(v)
        bounds.append(torch.stack([lo, hi]).to(specs[0][1].device))
        checked.append((name, upper, ignore_index))
    if not bounds:
        return
    values = _host_read(torch.cat(bounds))
    for (name, upper, ignore_index), lo, hi in zip(checked, values[0::2], values[1::2]):
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            extra = f" (or {ignore_index} to ignore a row)" if ignore_index is not None else ""
            raise ValueError(f"{name} holds {bad}, outside [0, {upper}){extra}")


def same_device(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, value in named[1:]:
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def real(name: str, value, *, minimum: float | None = None) -> float:
    """A finite real number (a Python or NumPy number or a one-element tensor; not a bool or a
    string), at least ``minimum`` when given."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


class NonFiniteError(FloatingPointError):
    """Raised by :func:`fastmft.inner_step` with ``check_finite=True`` when theta' has an inf or NaN."""


def finite(name: str, tensors: Iterable[torch.Tensor] = (), *, flag: torch.Tensor | bool = False) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` when ``flag`` (a non-finite flag computed
    elsewhere, e.g. in a kernel's pass) is set or one of ``tensors`` holds an inf or NaN."""
    if bool(flag) or not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteError(f"{name} has a non-finite value (inf or NaN)")
