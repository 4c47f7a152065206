"""Argument checks shared by the public ops: errors name the argument and say what was expected.

They run before any implementation (reference or kernel), so a bad index never reaches a kernel,
where an out-of-bounds read or write would corrupt memory silently.
"""
from __future__ import annotations

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


def index(name: str, value, n: int | None, upper: int, *, ignore_index: int | None = None) -> torch.Tensor:
    """An integer index tensor of shape [n] whose entries lie in [0, upper) (or equal ignore_index)."""
    tensor(name, value)
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    rank(name, value, 1)
    if n is not None and value.shape[0] != n:
        raise ValueError(f"{name} has {value.shape[0]} entries, expected {n}")
    if value.numel():
        checked = value if ignore_index is None else value[value != ignore_index]
        if checked.numel():
            lo, hi = torch.aminmax(checked)  # one reduction; .tolist() is the only device sync
            lo, hi = torch.stack([lo, hi]).tolist()
            if lo < 0 or hi >= upper:
                bad = lo if lo < 0 else hi
                extra = f" (or {ignore_index} to ignore a row)" if ignore_index is not None else ""
                raise ValueError(f"{name} holds {bad}, outside [0, {upper}){extra}")
    return value


def same_device(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, value in named[1:]:
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
