"""The encoder's numeric precision: ``fp32``, ``bf16`` or ``int8`` (docs/performance.md, "CPU
precision"). Only the encoder's forward changes; pooling, prototypes and typicality stay float32.

- ``fp32``: the encoder as loaded.
- ``bf16``: on a CPU, the forward under ``torch.autocast("cpu", torch.bfloat16)``; on CUDA, the
  weights cast to bfloat16 (what ``fastmft score`` always did there).
- ``int8`` (CPU only): the encoder's linear layers with int8 weights (one scale per output
  channel) and int8 activations (one scale per token), through :func:`quantize_int8`; the rest
  (attention products, softmax, GELU, LayerNorm) stays float32.

The default is bf16 on CUDA and on a CPU with native bf16 instructions (AVX512-BF16 or AMX-BF16,
read from /proc/cpuinfo), fp32 on any other CPU."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "int8")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU lists avx512_bf16 or amx_bf16 in ``cpuinfo``. False where the file is
    missing (not Linux) or lists neither: bf16 then runs emulated, slower than fp32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def default_precision(device: torch.device) -> str:
    """bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def resolve_precision(precision: str | None, device: torch.device, option: str = "`precision`") -> str:
    """``precision`` checked against ``device`` (None: :func:`default_precision`). ValueError for
    an unknown name, or int8 on a device other than the CPU."""
    if precision is None:
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"{option} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"{option} int8 is a CPU mode; on {device.type} use bf16 or fp32")
    return precision


def merge_quantize_alias(precision: str | None, quantize: str | None) -> str | None:
    """``quantize="int8"`` (the old option) as ``precision="int8"``; both given must agree."""
    if quantize is None:
        return precision
    if quantize != "int8":
        raise ValueError(f"`quantize` must be int8, got {quantize!r}")
    if precision not in (None, "int8"):
        raise ValueError(f"`quantize` int8 contradicts `precision` {precision}")
    return "int8"


def prepare_encoder(
    model: torch.nn.Module, precision: str, device: torch.device, *, cast_weights: bool = True
) -> torch.nn.Module:
    """``model`` in eval mode on ``device`` for ``precision``; run its forward inside
    :func:`encoder_autocast`. int8 returns a quantised copy (the caller's model is left alone);
    bf16 on CUDA casts the weights in place when ``cast_weights`` (faster there than autocast)."""
    model.eval()
    if precision == "int8":
        return quantize_int8(model)
    if precision == "bf16" and device.type == "cuda" and cast_weights:
        return model.to(device=device, dtype=torch.bfloat16)
    return model.to(device)


def encoder_autocast(precision: str, device: torch.device):
    """The context the encoder's forward runs in: autocast to bfloat16 for bf16."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Int8Linear(torch.nn.Module):
    """nn.Linear with int8 weights, one scale per output channel, and int8 activations, one scale
    per token (both symmetric), multiplied by ``torch._int_mm`` into int32 and rescaled to float32.
    Per-token scales keep one outlier token from flattening the others, which is where the
    per-tensor dynamic quantisation of ``torch.ao.quantization.quantize_dynamic`` lost its
    accuracy (docs/performance.md)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # [in, out]: _int_mm's second operand
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).t())
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
        q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.weight_int8).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (on the CPU) whose nn.Linear layers are :class:`Int8Linear`."""
    model = copy.deepcopy(model).cpu().float()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, Int8Linear(child))
    return model
