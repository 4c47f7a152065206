"""Weighted multi-head cross-entropy, forward and backward, all heads in one launch.

sum_h w_h * (sum over rows i with y_h,i != ignore_index of t_i * CE_h,i) / max(kept_h, 1), CE in
float32 for any logits dtype.

The H heads (different class counts C_h, dtypes and strides) travel as tuples of pointers, and
each program handles BLOCK_N rows of every head (MFT heads have 2 to 10 classes, so one row per
program would leave the GPU idle). Classes are streamed in BLOCK_C chunks with an online
log-sum-exp, so any C_h works.

Launches: forward = one kernel writing per-program partial sums (sum of t * CE and kept count per
head) + one single-program kernel reducing them deterministically into the loss and the per-head
scales w_h / max(kept_h, 1); backward = one kernel recomputing the log-sum-exp and writing the
gradient of every head's logits (fresh tensors, never the user's logits) and of sample_weight.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _util

_OP = "multi_head_cross_entropy"


@triton.jit
def _row_lse(x_ptr, sn, sc, rows, in_n, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    arange_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + arange_c
        in_c = cols < C
        x = tl.load(x_ptr + rows[:, None] * sn + cols[None, :] * sc, mask=in_n[:, None] & in_c[None, :], other=0.0)
        x = tl.where(in_c[None, :], x.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _mhce_fwd_kernel(
    xs, sns, scs, Cs,  # per head: logits pointer, row and class strides, class count
    ys, sys_,  # per head: targets pointer and stride
    w_ptr, swn,  # sample weights [N] (unused unless HAS_W)
    part_ptr, cnt_ptr,  # [P, H] float32 partial sums of t * CE, [P, H] int32 kept counts
    N, ignore_index,
    H: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < N
    if HAS_W:
        t = tl.load(w_ptr + rows * swn, mask=in_n, other=0.0).to(tl.float32)
    for h in tl.static_range(H):
        x_ptr = xs[h]
        y = tl.load(ys[h] + rows * sys_[h], mask=in_n, other=ignore_index).to(tl.int64)
        kept = in_n & (y != ignore_index)
        lse = _row_lse(x_ptr, sns[h], scs[h], rows, in_n, Cs[h], BLOCK_N, BLOCK_C)
        xt = tl.load(x_ptr + rows * sns[h] + y * scs[h], mask=kept, other=0.0).to(tl.float32)
        ce = lse - xt
        if HAS_W:
            ce = ce * t
        tl.store(part_ptr + pid * H + h, tl.sum(tl.where(kept, ce, 0.0), axis=0))
        tl.store(cnt_ptr + pid * H + h, tl.sum(kept.to(tl.int32), axis=0))


@triton.jit
def _mhce_finalize_kernel(
    part_ptr, cnt_ptr, hw,  # partials [P, H]; head weights: tuple of H floats
    loss_ptr, scale_ptr,  # loss [] float32; scale [H] float32 = w_h / max(kept_h, 1)
    P,
    H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    hh = tl.arange(0, BLOCK_H)
    in_h = hh < H
    s = tl.zeros([BLOCK_H], dtype=tl.float32)
    k = tl.zeros([BLOCK_H], dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        m2 = (pp < P)[:, None] & in_h[None, :]
        offs = pp[:, None] * H + hh[None, :]
        s += tl.sum(tl.load(part_ptr + offs, mask=m2, other=0.0), axis=0)
        k += tl.sum(tl.load(cnt_ptr + offs, mask=m2, other=0).to(tl.int64), axis=0)
    w = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h in tl.static_range(H):
        w = tl.where(hh == h, hw[h], w)
    scale = w / tl.maximum(k.to(tl.float32), 1.0)
    tl.store(scale_ptr + hh, scale, mask=in_h)
    tl.store(loss_ptr, tl.sum(tl.where(in_h, scale * s, 0.0), axis=0))


@triton.jit
def _mhce_bwd_kernel(
    xs, sns, scs, Cs, ys, sys_,
    gxs,  # per head: gradient output [N, C_h], contiguous
    w_ptr, swn, gw_ptr,  # sample weights and their gradient [N] (contiguous)
    scale_ptr, gout_ptr,  # per-head scales [H] and the incoming gradient of the loss (scalar)
    N, ignore_index,
    H: tl.constexpr, HAS_W: tl.constexpr, NEED_GW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < N
    g = tl.load(gout_ptr).to(tl.float32)
    if HAS_W:
        t = tl.load(w_ptr + rows * swn, mask=in_n, other=0.0).to(tl.float32)
    gw = tl.zeros([BLOCK_N], dtype=tl.float32)
    arange_c = tl.arange(0, BLOCK_C)
    for h in tl.static_range(H):
        x_ptr = xs[h]
        gx_ptr = gxs[h]
        C = Cs[h]
        scale = tl.load(scale_ptr + h) * g
        y = tl.load(ys[h] + rows * sys_[h], mask=in_n, other=ignore_index).to(tl.int64)
        kept = in_n & (y != ignore_index)
        lse = _row_lse(x_ptr, sns[h], scs[h], rows, in_n, C, BLOCK_N, BLOCK_C)
        coef = tl.zeros([BLOCK_N], dtype=tl.float32) + scale
        if HAS_W:
            coef = coef * t
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + arange_c
            in_c = cols < C
            m2 = in_n[:, None] & in_c[None, :]
            x = tl.load(x_ptr + rows[:, None] * sns[h] + cols[None, :] * scs[h], mask=m2, other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            d = p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
            gx = tl.where(kept[:, None], coef[:, None] * d, 0.0)
            tl.store(gx_ptr + rows[:, None] * C + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m2)
        if NEED_GW:
            xt = tl.load(x_ptr + rows * sns[h] + y * scs[h], mask=kept, other=0.0).to(tl.float32)
            gw += tl.where(kept, scale * (lse - xt), 0.0)
    if NEED_GW:
        tl.store(gw_ptr + rows, gw.to(gw_ptr.dtype.element_ty), mask=in_n)


def _blocks(max_c: int) -> tuple[int, int]:
    block_c = max(2, min(64, _util.next_pow2(max_c)))
    budget = 8192 if _util.interpreter() else 2048  # elements of one [BLOCK_N, BLOCK_C] tile
    block_n = max(16, min(256 if not _util.interpreter() else 1024, budget // block_c))
    return block_n, block_c


def _check(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], sample_weight, head_weight) -> int:
    if not logits or len(logits) != len(targets) or len(head_weight) != len(logits):
        raise ValueError(f"{_OP}: need H >= 1 logits, targets and head weights")
    N = logits[0].shape[0]
    for h, (x, y) in enumerate(zip(logits, targets)):
        _util.check_dtype(_OP, f"logits[{h}]", x)
        if x.dim() != 2 or x.shape[0] != N or x.shape[1] < 1:
            raise ValueError(f"{_OP}: logits[{h}] is {tuple(x.shape)}, expected [{N}, C >= 1]")
        if y.shape != (N,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"{_OP}: targets[{h}] must be an integer tensor [{N}]")
    tensors = [*logits, *targets]
    if sample_weight is not None:
        _util.check_dtype(_OP, "sample_weight", sample_weight)
        if sample_weight.shape != (N,):
            raise ValueError(f"{_OP}: sample_weight must be [{N}]")
        tensors.append(sample_weight)
    _util.check_device(_OP, *tensors)
    return N


def forward(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], sample_weight: torch.Tensor | None,
            head_weight: Sequence[float], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [] float32, scale [H] float32 = w_h / max(kept_h, 1)) in two launches."""
    N = _check(logits, targets, sample_weight, head_weight)
    H = len(logits)
    device = logits[0].device
    block_n, block_c = _blocks(max(x.shape[1] for x in logits))
    P = max(1, triton.cdiv(N, block_n))
    part = _util.empty((P, H), torch.float32, device)
    cnt = _util.empty((P, H), torch.int32, device)
    loss = _util.empty((), torch.float32, device)
    scale = _util.empty((H,), torch.float32, device)
    w = sample_weight if sample_weight is not None else part
    _mhce_fwd_kernel[(P,)](
        tuple(logits), tuple(x.stride(0) for x in logits), tuple(x.stride(1) for x in logits),
        tuple(x.shape[1] for x in logits),
        tuple(targets), tuple(y.stride(0) for y in targets),
        w, w.stride(0),
        part, cnt,
        N, int(ignore_index),
        H=H, HAS_W=sample_weight is not None, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=4,
    )
    _mhce_finalize_kernel[(1,)](
        part, cnt, tuple(float(v) for v in head_weight), loss, scale, P,
        H=H, BLOCK_H=max(2, _util.next_pow2(H)), BLOCK_P=max(16, min(1024, _util.next_pow2(P))),
        num_warps=4,
    )
    return loss, scale


def backward(grad_loss: torch.Tensor, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
             sample_weight: torch.Tensor | None, scale: torch.Tensor, ignore_index: int, need_grad_weight: bool):
    """Gradients of every head's logits (fresh contiguous tensors in the logits' dtypes) and of
    sample_weight (or None), in one launch."""
    N = _check(logits, targets, sample_weight, [1.0] * len(logits))
    H = len(logits)
    device = logits[0].device
    _util.check_device(_OP, logits[0], grad_loss, scale)
    grads = [_util.empty(tuple(x.shape), x.dtype, device) for x in logits]
    need_gw = bool(need_grad_weight and sample_weight is not None)
    grad_w = _util.empty((N,), sample_weight.dtype, device) if need_gw else None
    if N == 0:
        return grads, grad_w
    block_n, block_c = _blocks(max(x.shape[1] for x in logits))
    w = sample_weight if sample_weight is not None else scale
    gw = grad_w if grad_w is not None else scale
    _mhce_bwd_kernel[(triton.cdiv(N, block_n),)](
        tuple(logits), tuple(x.stride(0) for x in logits), tuple(x.stride(1) for x in logits),
        tuple(x.shape[1] for x in logits),
        tuple(targets), tuple(y.stride(0) for y in targets),
        tuple(grads),
        w, w.stride(0), gw,
        scale, grad_loss.reshape(()).to(torch.float32) if grad_loss.dtype != torch.float32 else grad_loss,
        N, int(ignore_index),
        H=H, HAS_W=sample_weight is not None, NEED_GW=need_gw, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=4,
    )
    return grads, grad_w
