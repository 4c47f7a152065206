"""Shared helpers of the launch functions: device checks and guard, tile choice, output allocation.

Tile tables. Each kernel module keeps its tile configurations as data: for every block size a
tuple of the powers of two it may take, and ``fit`` picks the smallest that covers the problem
(the largest otherwise). The GPU and the Triton interpreter use the same tables, so the tests
(tests/kernels/test_kernel_gpu_faithful.py) execute every configuration a GPU can pick, and the compile-only test
checks each one's registers and spills for sm_90.

``POISON`` is a test hook: when true, every output a kernel writes with plain stores is filled
with NaN (floats) or a sentinel (integers) before the launch, so a test fails if a kernel leaves
an element unwritten. Outputs that kernels accumulate into with atomics are zero-initialised by
contract and are not poisoned.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

POISON = False
_INT_POISON = -123456789

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fit(n: int, choices: tuple[int, ...]) -> int:
    """The smallest of ``choices`` (ascending powers of two) that covers n, else the largest."""
    for c in choices:
        if c >= n:
            return c
    return choices[-1]


def interpreter() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1 set before import)."""
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


def on_device(device: torch.device):
    """Context for a launch: Triton launches on the *current* CUDA device, so tensors on cuda:1
    while cuda:0 is current would hand one GPU another GPU's pointers."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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


# Programs per SM that a row-chunked launch aims for. Grid sizes are not tile configurations: the
# interpreter uses a small SM count so that tests still cover several chunks on small inputs.
INTERPRETER_SMS = 4


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (INTERPRETER_SMS elsewhere)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
