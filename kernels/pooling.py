"""Fused multi-layer masked mean pooling, forward and backward.

One launch pools L layers given as L separate [B, T, D] tensors (any strides, e.g. the tuple a
Hugging Face encoder returns, or views of a stacked tensor) without stacking them: the layers
travel as a tuple of pointers with their own strides, so each keeps Triton's alignment and
stride-1 specialisation. The grid is (B, D blocks, L): program (b, d, l) streams the [T, BLOCK_D]
slab of row b, columns d, of layer l (whose pointer and strides it selects from the tuples at run
time), accumulating in float32, and counts the row's valid tokens in the same pass over the mask.
Padded positions are never loaded (masked loads), so they cost no bandwidth and non-finite values
there cannot leak into the mean.

Why this shape: pooling is bound by bytes in flight. The loop over T is software-pipelined
(``tl.range(..., num_stages=NUM_STAGES)``): on sm_80+ the token tiles become asynchronous copies
into shared memory (cp.async, 16 bytes a thread), NUM_STAGES - 1 tiles ahead, where a plain loop
has one tile in flight per program. Putting L in the grid gives 3x the programs of a (B, D) grid:
at [3, 256, 512, 768] bf16, 4,608 programs; at 64 registers and 16 KB of shared memory, 8 fit on
an SM, 4.4 waves on 132 SMs (a (B, D) grid made 1.45 waves, a thin tail). Counting the tokens in
the streaming pass reads no extra byte (each program loads the mask row anyway; it is L2-resident
across the programs of a row).

Backward: d mean_l[b, d] / d h_l[b, t, d] = valid[b, t] / count[b], so the kernel writes
grad / count at valid positions and 0 elsewhere into fresh contiguous tensors.

Offsets: every index that is multiplied by a stride is int64 first, since index * stride of a
strided view can pass 2**31 elements (a [16, 768] view with stride(1) = 2**22 reaches 3.2e9).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _util

_OP = "masked_mean_pool"

# Tile table. BLOCK_D covers the hidden size in up to 128 columns (one 128-bit access per thread
# for 16-bit inputs with 4 warps); BLOCK_T = 32 tokens keeps the [32, 128] float32 accumulator at
# 32 registers per thread (compiled for sm_90 with Triton 3.9: 64 registers for the forward, no
# spill). NUM_STAGES = 3: two [32, 128] tiles in flight (16 KB of shared memory for bf16, 32 KB for
# float32): 8 bf16 programs still share an SM (registers bound it first; float32: 6, by shared memory).
BLOCK_T = (16, 32)
BLOCK_D = (16, 32, 64, 128)
NUM_WARPS = 4
NUM_STAGES = 3


def tile(T: int, D: int) -> dict:
    return dict(BLOCK_T=_util.fit(T, BLOCK_T), BLOCK_D=_util.fit(D, BLOCK_D), num_warps=NUM_WARPS)


def all_tiles() -> list[dict]:
    return [dict(BLOCK_T=t, BLOCK_D=d, num_warps=NUM_WARPS) for t, d in itertools.product(BLOCK_T, BLOCK_D)]


@triton.jit
def _valid_tokens(mask_ptr, stride_mask_b, stride_mask_t, b, offs_t, T, SKIP_CLS: tl.constexpr):
    """[BLOCK_T] bool: token t of row b is inside T, unmasked, and not [CLS] when SKIP_CLS."""
    in_t = offs_t < T
    m = tl.load(mask_ptr + b * stride_mask_b + offs_t.to(tl.int64) * stride_mask_t, mask=in_t, other=0)
    valid = (m != 0) & in_t
    if SKIP_CLS:
        valid = valid & (offs_t > 0)
    return valid


@triton.jit
def _pool_fwd_kernel(
    layer_ptrs,  # L pointers: layer l's token states [B, T, D], any strides, fp32/fp16/bf16
    strides_b,
    strides_t,
    strides_d,  # L ints each: layer l's strides (elements)
    mask_ptr,
    stride_mask_b,
    stride_mask_t,  # attention mask [B, T] (any integer or float dtype, bool as uint8; nonzero = valid)
    out_ptr,  # pooled [L, B, D], contiguous, the layers' dtype
    count_ptr,  # [B] float32 valid-token counts (written by the programs of layer 0, D-block 0)
    B,
    T,
    D,
    L: tl.constexpr,
    SKIP_CLS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Program (b, d, l) pools row b, columns [d BLOCK_D, (d + 1) BLOCK_D) of layer l, counting the
    row's valid tokens in the same pass over the mask."""
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    l = tl.program_id(2)
    # This program's layer: a tuple cannot be indexed at run time, so select among its entries.
    x_ptr = layer_ptrs[0]
    stride_b = strides_b[0]
    stride_t = strides_t[0]
    stride_d = strides_d[0]
    for i in tl.static_range(1, L):
        x_ptr = tl.where(l == i, layer_ptrs[i], x_ptr)
        stride_b = tl.where(l == i, strides_b[i], stride_b)
        stride_t = tl.where(l == i, strides_t[i], stride_t)
        stride_d = tl.where(l == i, strides_d[i], stride_d)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    in_d = offs_d < D
    row = x_ptr + b * stride_b + offs_d[None, :] * stride_d
    arange_t = tl.arange(0, BLOCK_T)
    n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # NUM_STAGES - 1 tiles in flight per program (asynchronous copies on sm_80+), see the tile table.
    for t0 in tl.range(0, T, BLOCK_T, num_stages=NUM_STAGES):
        offs_t = t0 + arange_t
        valid = _valid_tokens(mask_ptr, stride_mask_b, stride_mask_t, b, offs_t, T, SKIP_CLS)
        n += valid.to(tl.float32)
        x = tl.load(
            row + offs_t[:, None].to(tl.int64) * stride_t,
            mask=valid[:, None] & in_d[None, :],
            other=0.0,
            eviction_policy="evict_first",  # streamed once: keep the cache for the mask
        )
        acc += x.to(tl.float32)
    count = tl.sum(n, axis=0)
    mean = tl.sum(acc, axis=0) / tl.maximum(count, 1.0)
    tl.store(out_ptr + (b + l * B) * D + offs_d, mean.to(out_ptr.dtype.element_ty), mask=in_d)
    tl.store(count_ptr + b, count, mask=(pid_d == 0) & (l == 0))


@triton.jit
def _pool_bwd_kernel(
    grad_layer_ptrs,  # L output pointers, each [B, T, D] contiguous, the layers' dtype
    grad_ptr,  # gradient of the pooled output [L, B, D], contiguous
    mask_ptr,
    stride_mask_b,
    stride_mask_t,
    count_ptr,  # [B] float32 valid-token counts from the forward
    B,
    T,
    D,
    num_t_blocks,
    L: tl.constexpr,
    SKIP_CLS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_t_blocks).to(tl.int64)
    tb = pid % num_t_blocks
    pid_d = tl.program_id(1)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    in_t = offs_t < T
    in_d = offs_d < D
    valid = _valid_tokens(mask_ptr, stride_mask_b, stride_mask_t, b, offs_t, T, SKIP_CLS)
    inv = 1.0 / tl.maximum(tl.load(count_ptr + b), 1.0)
    out_offs = b * T * D + offs_t[:, None].to(tl.int64) * D + offs_d[None, :]
    for l in tl.static_range(L):
        g = tl.load(grad_ptr + (b + l * B) * D + offs_d, mask=in_d, other=0.0).to(tl.float32) * inv
        gx = tl.where(valid[:, None], g[None, :], 0.0)
        gx_ptr = grad_layer_ptrs[l]
        tl.store(gx_ptr + out_offs, gx.to(gx_ptr.dtype.element_ty), mask=in_t[:, None] & in_d[None, :])


def _check(layers: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.device:
    if not layers:
        raise ValueError(f"{_OP}: no layers")
    shape, dtype = layers[0].shape, layers[0].dtype
    for i, h in enumerate(layers):
        _util.check_dtype(_OP, f"hidden_states[{i}]", h)
        if h.dim() != 3 or h.shape != shape or h.dtype != dtype:
            raise ValueError(
                f"{_OP}: hidden_states[{i}] is {tuple(h.shape)} {h.dtype}, expected {tuple(shape)} {dtype}"
            )
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape[:2]):
        raise ValueError(f"{_OP}: attention_mask is {tuple(mask.shape)}, expected {tuple(shape[:2])}")
    return _util.check_device(_OP, *layers, mask)


def pool_forward(layers: Sequence[torch.Tensor], attention_mask: torch.Tensor, skip_cls: bool):
    """Pooled [L, B, D] (layers' dtype) and valid-token counts [B] float32, in one launch."""
    layers = list(layers)
    device = _check(layers, attention_mask)
    L = len(layers)
    B, T, D = layers[0].shape
    out = _util.empty((L, B, D), layers[0].dtype, device)
    counts = _util.empty((B,), torch.float32, device)
    if B == 0 or D == 0 or T == 0:
        out.zero_()
        counts.zero_()
        return out, counts
    mask = _util.mask_view(attention_mask)
    cfg = tile(T, D)
    with _util.on_device(device):
        _pool_fwd_kernel[(B, triton.cdiv(D, cfg["BLOCK_D"]), L)](
            tuple(layers),
            tuple(h.stride(0) for h in layers),
            tuple(h.stride(1) for h in layers),
            tuple(h.stride(2) for h in layers),
            mask,
            mask.stride(0),
            mask.stride(1),
            out,
            counts,
            B,
            T,
            D,
            L=L,
            SKIP_CLS=bool(skip_cls),
            NUM_STAGES=NUM_STAGES,
            **cfg,
        )
    return out, counts


def pool_backward(
    grad_out: torch.Tensor,
    attention_mask: torch.Tensor,
    counts: torch.Tensor,
    skip_cls: bool,
    T: int,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Gradients [B, T, D] (contiguous, ``dtype``) of each of the L layers, in one launch."""
    L, B, D = grad_out.shape
    device = _util.check_device(_OP, grad_out, attention_mask, counts)
    grads = [_util.empty((B, T, D), dtype, device) for _ in range(L)]
    if B == 0 or D == 0 or T == 0:
        return [g.zero_() for g in grads]
    mask = _util.mask_view(attention_mask)
    grad_out = grad_out.contiguous()  # [L, B, D] is small beside the [B, T, D] outputs
    cfg = tile(T, D)
    num_t_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    with _util.on_device(device):
        _pool_bwd_kernel[(B * num_t_blocks, triton.cdiv(D, cfg["BLOCK_D"]))](
            tuple(grads),
            grad_out,
            mask,
            mask.stride(0),
            mask.stride(1),
            counts,
            B,
            T,
            D,
            num_t_blocks,
            L=L,
            SKIP_CLS=bool(skip_cls),
            **cfg,
        )
    return grads
