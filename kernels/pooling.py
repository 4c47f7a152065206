"""Fused multi-layer masked mean pooling, forward and backward.

One launch pools L layers given as L separate [B, T, D] tensors (any strides, e.g. the tuple a
Hugging Face encoder returns, or views of a stacked tensor) without stacking them: the layers
travel as a tuple of pointers with their own strides, so each keeps Triton's alignment and
stride-1 specialisation. Each program owns one row b and one block of D columns, counts the
row's valid tokens once, then streams the row's [T, BLOCK_D] slab of every layer, accumulating in
float32. Padded positions are never loaded (masked loads), so they cost no bandwidth and non-finite
values there cannot leak into the mean.

Backward writes grad / count at valid positions and 0 elsewhere into fresh contiguous tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _util

_OP = "masked_mean_pool"


@triton.jit
def _valid_tokens(mask_ptr, msb, mst, b, offs_t, T, SKIP_CLS: tl.constexpr):
    in_t = offs_t < T
    m = tl.load(mask_ptr + b * msb + offs_t * mst, mask=in_t, other=0)
    valid = (m != 0) & in_t
    if SKIP_CLS:
        valid = valid & (offs_t > 0)
    return valid


@triton.jit
def _pool_fwd_kernel(
    xs, sbs, sts, sds,  # tuples of L pointers and their B, T, D strides
    mask_ptr, msb, mst,
    out_ptr, osl, osb,  # out [L, B, D], D contiguous
    cnt_ptr,  # [B] float32 valid-token counts (written by the programs of D-block 0)
    T, D,
    L: tl.constexpr, SKIP_CLS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    arange_t = tl.arange(0, BLOCK_T)

    n = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        valid = _valid_tokens(mask_ptr, msb, mst, b, t0 + arange_t, T, SKIP_CLS)
        n += valid.to(tl.float32)
    count = tl.sum(n, axis=0)
    inv = 1.0 / tl.maximum(count, 1.0)
    tl.store(cnt_ptr + b, count, mask=pid_d == 0)

    for l in tl.static_range(L):
        x_ptr = xs[l]
        row = x_ptr + b * sbs[l]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + arange_t
            valid = _valid_tokens(mask_ptr, msb, mst, b, offs_t, T, SKIP_CLS)
            x = tl.load(
                row + offs_t[:, None].to(tl.int64) * sts[l] + offs_d[None, :] * sds[l],
                mask=valid[:, None] & in_d[None, :],
                other=0.0,
                eviction_policy="evict_first",  # streamed once: keep the cache for the mask
            )
            acc += x.to(tl.float32)
        mean = tl.sum(acc, axis=0) * inv
        tl.store(out_ptr + l * osl + b * osb + offs_d, mean.to(out_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _pool_bwd_kernel(
    gxs,  # tuple of L output pointers, each [B, T, D] contiguous
    g_ptr, gsl, gsb, gsd,  # grad of the pooled output [L, B, D]
    mask_ptr, msb, mst,
    cnt_ptr,
    T, D, num_t_blocks,
    L: tl.constexpr, SKIP_CLS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_t_blocks).to(tl.int64)
    tb = pid % num_t_blocks
    pid_d = tl.program_id(1)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_t = offs_t < T
    in_d = offs_d < D
    valid = _valid_tokens(mask_ptr, msb, mst, b, offs_t, T, SKIP_CLS)
    inv = 1.0 / tl.maximum(tl.load(cnt_ptr + b), 1.0)
    out_offs = b * T * D + offs_t[:, None].to(tl.int64) * D + offs_d[None, :]
    for l in tl.static_range(L):
        g = tl.load(g_ptr + l * gsl + b * gsb + offs_d * gsd, mask=in_d, other=0.0).to(tl.float32) * inv
        gx = tl.where(valid[:, None], g[None, :], 0.0)
        gx_ptr = gxs[l]
        tl.store(gx_ptr + out_offs, gx.to(gx_ptr.dtype.element_ty), mask=in_t[:, None] & in_d[None, :])


def _blocks(T: int, D: int) -> tuple[int, int]:
    block_d = max(16, min(128, _util.next_pow2(D)))
    block_t = max(16, min(64 if _util.interpreter() else 32, _util.next_pow2(T)))
    return block_t, block_d


def _check(layers: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
    if not layers:
        raise ValueError(f"{_OP}: no layers")
    shape, dtype = layers[0].shape, layers[0].dtype
    for i, h in enumerate(layers):
        _util.check_dtype(_OP, f"hidden_states[{i}]", h)
        if h.dim() != 3 or h.shape != shape or h.dtype != dtype:
            raise ValueError(f"{_OP}: hidden_states[{i}] is {tuple(h.shape)} {h.dtype}, expected {tuple(shape)} {dtype}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape[:2]):
        raise ValueError(f"{_OP}: attention_mask is {tuple(mask.shape)}, expected {tuple(shape[:2])}")
    _util.check_device(_OP, *layers, mask)


def pool_forward(layers: Sequence[torch.Tensor], attention_mask: torch.Tensor, skip_cls: bool):
    """Pooled [L, B, D] (layers' dtype) and valid-token counts [B] float32, in one launch."""
    layers = list(layers)
    _check(layers, attention_mask)
    L = len(layers)
    B, T, D = layers[0].shape
    device = layers[0].device
    out = _util.empty((L, B, D), layers[0].dtype, device)
    counts = _util.empty((B,), torch.float32, device)
    if B == 0 or D == 0 or T == 0:
        out.zero_()
        counts.zero_()
        return out, counts
    mask = _util.mask_view(attention_mask)
    block_t, block_d = _blocks(T, D)
    grid = (B, triton.cdiv(D, block_d))
    _pool_fwd_kernel[grid](
        tuple(layers), tuple(h.stride(0) for h in layers), tuple(h.stride(1) for h in layers),
        tuple(h.stride(2) for h in layers),
        mask, mask.stride(0), mask.stride(1),
        out, out.stride(0), out.stride(1),
        counts,
        T, D,
        L=L, SKIP_CLS=bool(skip_cls), BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4,
    )
    return out, counts


def pool_backward(grad_out: torch.Tensor, attention_mask: torch.Tensor, counts: torch.Tensor, skip_cls: bool,
                  T: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients [B, T, D] (contiguous, ``dtype``) of each of the L layers, in one launch."""
    L, B, D = grad_out.shape
    device = grad_out.device
    _util.check_device(_OP, grad_out, attention_mask, counts)
    grads = [_util.empty((B, T, D), dtype, device) for _ in range(L)]
    if B == 0 or D == 0 or T == 0:
        return [g.zero_() for g in grads]
    mask = _util.mask_view(attention_mask)
    block_t, block_d = _blocks(T, D)
    num_t_blocks = triton.cdiv(T, block_t)
    grid = (B * num_t_blocks, triton.cdiv(D, block_d))
    _pool_bwd_kernel[grid](
        tuple(grads),
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        mask, mask.stride(0), mask.stride(1),
        counts,
        T, D, num_t_blocks,
        L=L, SKIP_CLS=bool(skip_cls), BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4,
    )
    return grads
