"""Shared helpers of the launch functions: device checks, block sizes, output allocation.

``POISON`` is a test hook: when true, every output a kernel writes with plain stores is filled
with NaN (floats) or a sentinel (integers) before the launch, so a test fails if a kernel leaves
an element unwritten. Outputs that kernels accumulate into with atomics are zero-initialised by
contract and are not poisoned.
"""
from __future__ import annotations

import functools
import os

import torch

POISON = False
_INT_POISON = -123456789

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(op: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that Triton can run on (CUDA, or CPU through the interpreter)."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: tensors on different devices ({device} and {t.device})")
    if device.type != "cuda" and not interpreter():
        raise RuntimeError(
            f"{op}: Triton kernels need CUDA tensors, or CPU tensors with the Triton interpreter "
            f"(TRITON_INTERPRET=1 set before triton is imported); got {device.type} tensors"
        )
    return device


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the Triton kernel takes float32, float16 or bfloat16 {name}, got {t.dtype}")


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, poisoned when the POISON test hook is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else _INT_POISON)
    return out


def mask_view(mask: torch.Tensor) -> torch.Tensor:
    """A Triton-loadable view of an attention mask: bool is reinterpreted as uint8 (no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small constant elsewhere: the interpreter)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
