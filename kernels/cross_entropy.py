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

Gradient. With s_h = w_h / max(kept_h, 1) (kept_h counts targets, so it is a constant) and
CE_h,i = lse_h,i - x_h,i,y where lse_h,i = log sum_c exp(x_h,i,c):
    L = sum_h s_h sum_{i kept} t_i CE_h,i
    dL/dx_h,i,c = s_h t_i (softmax(x_h,i)_c - [c == y_h,i])   for kept rows, 0 for ignored rows
    dL/dt_i     = sum_h s_h [i kept in h] CE_h,i
and both are multiplied by the incoming gradient g of the loss. The backward recomputes lse
(one extra read of the logits) instead of storing it: the logits are small (C_h <= ~100) and
saving lse would cost a [H, N] buffer plus its write.

Offsets: row and class indices are int64 before they multiply a stride (a strided view's
index * stride can pass 2**31 elements).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _util

_OP = "multi_head_cross_entropy"


@triton.jit
def _row_lse(x_ptr, stride_n, stride_c, rows, in_n, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_N] float32 log-sum-exp of rows ``rows`` of the [N, C] logits, streaming C in
    BLOCK_C chunks (online: running max m and sum s of exp(x - m))."""
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    arange_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + arange_c).to(tl.int64)
        in_c = cols < C
        x = tl.load(
            x_ptr + rows[:, None] * stride_n + cols[None, :] * stride_c, mask=in_n[:, None] & in_c[None, :], other=0.0
        )
        x = tl.where(in_c[None, :], x.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _mhce_fwd_kernel(
    logit_ptrs,
    strides_n,
    strides_c,
    num_classes,  # per head h: logits [N, C_h], its strides, C_h
    target_ptrs,
    strides_target,  # per head h: targets [N] (integer, in [0, C_h) or ignore_index)
    weight_ptr,
    stride_weight,  # sample weights t [N] (read only when HAS_W)
    part_ptr,
    cnt_ptr,  # [P, H] float32 partial sums of t * CE, [P, H] int32 kept counts
    N,
    ignore_index,
    H: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < N
    if HAS_W:
        t = tl.load(weight_ptr + rows * stride_weight, mask=in_n, other=0.0).to(tl.float32)
    for h in tl.static_range(H):
        x_ptr = logit_ptrs[h]
        y = tl.load(target_ptrs[h] + rows * strides_target[h], mask=in_n, other=ignore_index).to(tl.int64)
        kept = in_n & (y != ignore_index)
        lse = _row_lse(x_ptr, strides_n[h], strides_c[h], rows, in_n, num_classes[h], BLOCK_N, BLOCK_C)
        xt = tl.load(x_ptr + rows * strides_n[h] + y * strides_c[h], mask=kept, other=0.0).to(tl.float32)
        ce = lse - xt
        if HAS_W:
            ce = ce * t
        tl.store(part_ptr + pid * H + h, tl.sum(tl.where(kept, ce, 0.0), axis=0))
        tl.store(cnt_ptr + pid * H + h, tl.sum(kept.to(tl.int32), axis=0))


@triton.jit
def _mhce_finalize_kernel(
    part_ptr,
    cnt_ptr,
    head_weights,  # partials [P, H] (contiguous); head weights: tuple of H floats
    loss_ptr,
    scale_ptr,  # loss [] float32; scale [H] float32 = w_h / max(kept_h, 1)
    P,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
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
        w = tl.where(hh == h, head_weights[h], w)
    scale = w / tl.maximum(k.to(tl.float32), 1.0)
    tl.store(scale_ptr + hh, scale, mask=in_h)
    tl.store(loss_ptr, tl.sum(tl.where(in_h, scale * s, 0.0), axis=0))


@triton.jit
def _mhce_bwd_kernel(
    logit_ptrs,
    strides_n,
    strides_c,
    num_classes,
    target_ptrs,
    strides_target,  # as in the forward
    grad_logit_ptrs,  # per head h: gradient output [N, C_h], contiguous, the logits' dtype
    weight_ptr,
    stride_weight,
    grad_weight_ptr,  # sample weights t [N] and their gradient [N] (contiguous)
    scale_ptr,
    grad_loss_ptr,  # per-head scales s_h [H] float32 and the incoming gradient g (scalar)
    N,
    ignore_index,
    H: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_GW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < N
    g = tl.load(grad_loss_ptr).to(tl.float32)
    if HAS_W:
        t = tl.load(weight_ptr + rows * stride_weight, mask=in_n, other=0.0).to(tl.float32)
    grad_t = tl.zeros([BLOCK_N], dtype=tl.float32)
    arange_c = tl.arange(0, BLOCK_C)
    for h in tl.static_range(H):
        x_ptr = logit_ptrs[h]
        gx_ptr = grad_logit_ptrs[h]
        C = num_classes[h]
        scale = tl.load(scale_ptr + h) * g  # g * s_h
        y = tl.load(target_ptrs[h] + rows * strides_target[h], mask=in_n, other=ignore_index).to(tl.int64)
        kept = in_n & (y != ignore_index)
        lse = _row_lse(x_ptr, strides_n[h], strides_c[h], rows, in_n, C, BLOCK_N, BLOCK_C)
        coef = tl.zeros([BLOCK_N], dtype=tl.float32) + scale  # g * s_h * t_i
        if HAS_W:
            coef = coef * t
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + arange_c).to(tl.int64)
            in_c = cols < C
            m2 = in_n[:, None] & in_c[None, :]
            x = tl.load(x_ptr + rows[:, None] * strides_n[h] + cols[None, :] * strides_c[h], mask=m2, other=0.0).to(
                tl.float32
            )
            d = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
            gx = tl.where(kept[:, None], coef[:, None] * d, 0.0)  # ignored rows: exactly 0
            tl.store(gx_ptr + rows[:, None] * C + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m2)
        if NEED_GW:
            xt = tl.load(x_ptr + rows * strides_n[h] + y * strides_c[h], mask=kept, other=0.0).to(tl.float32)
            grad_t += tl.where(kept, scale * (lse - xt), 0.0)
    if NEED_GW:
        tl.store(grad_weight_ptr + rows, grad_t.to(grad_weight_ptr.dtype.element_ty), mask=in_n)


# Tile table. BLOCK_C covers the widest head in chunks of up to 64 classes (wider heads stream
# through the online log-sum-exp); BLOCK_N rows make a [BLOCK_N, BLOCK_C] tile of at most 2048
# values, so narrow MFT heads (2 to 10 classes) still give each program enough rows. Measured on
# an H200 (triton 3.6): the backward at BLOCK_C = 64 with 32 rows spilled (255 registers, 12 to
# 200 bytes for 2 to 8 heads), 16 rows do not. Open: 8 float32 two-class heads at 256 rows spilled
# 2 bytes there (128 registers) but not with triton 3.9 (compile-only test), where 64 or 128 rows
# spill 4 to 8 bytes instead, so the table keeps 256.
CE_ROWS = {2: 256, 4: 256, 8: 256, 16: 128, 32: 64, 64: 16}  # BLOCK_C -> BLOCK_N
CE_BLOCK_C = tuple(CE_ROWS)
FINALIZE_BLOCK_H = (2, 4, 8, 16, 32)
FINALIZE_BLOCK_P = 256
MAX_HEADS = FINALIZE_BLOCK_H[-1]
NUM_WARPS = 4


def tile(max_classes: int) -> dict:
    block_c = _util.fit(max_classes, CE_BLOCK_C)
    return dict(BLOCK_N=CE_ROWS[block_c], BLOCK_C=block_c, num_warps=NUM_WARPS)


def all_tiles() -> list[dict]:
    return [dict(BLOCK_N=n, BLOCK_C=c, num_warps=NUM_WARPS) for c, n in CE_ROWS.items()]


def _check(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], sample_weight, head_weight) -> int:
    if not logits or len(logits) != len(targets) or len(head_weight) != len(logits):
        raise ValueError(f"{_OP}: need H >= 1 logits, targets and head weights")
    if len(logits) > MAX_HEADS:
        raise ValueError(f"{_OP}: the kernel takes at most {MAX_HEADS} heads, got {len(logits)}")
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
    return _util.check_device(_OP, *tensors)


def forward(
    logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    sample_weight: torch.Tensor | None,
    head_weight: Sequence[float],
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [] float32, scale [H] float32 = w_h / max(kept_h, 1)) in two launches."""
    device = _check(logits, targets, sample_weight, head_weight)
    N, H = logits[0].shape[0], len(logits)
    cfg = tile(max(x.shape[1] for x in logits))
    P = max(1, triton.cdiv(N, cfg["BLOCK_N"]))
    part = _util.empty((P, H), torch.float32, device)
    cnt = _util.empty((P, H), torch.int32, device)
    loss = _util.empty((), torch.float32, device)
    scale = _util.empty((H,), torch.float32, device)
    w = sample_weight if sample_weight is not None else part
    with _util.on_device(device):
        _mhce_fwd_kernel[(P,)](
            tuple(logits),
            tuple(x.stride(0) for x in logits),
            tuple(x.stride(1) for x in logits),
            tuple(x.shape[1] for x in logits),
            tuple(targets),
            tuple(y.stride(0) for y in targets),
            w,
            w.stride(0),
            part,
            cnt,
            N,
            int(ignore_index),
            H=H,
            HAS_W=sample_weight is not None,
            **cfg,
        )
        _mhce_finalize_kernel[(1,)](
            part,
            cnt,
            tuple(float(v) for v in head_weight),
            loss,
            scale,
            P,
            H=H,
            BLOCK_H=_util.fit(H, FINALIZE_BLOCK_H),
            BLOCK_P=FINALIZE_BLOCK_P,
            num_warps=NUM_WARPS,
        )
    return loss, scale


def backward(
    grad_loss: torch.Tensor,
    logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    sample_weight: torch.Tensor | None,
    scale: torch.Tensor,
    ignore_index: int,
    need_grad_weight: bool,
):
    """Gradients of every head's logits (fresh contiguous tensors in the logits' dtypes) and of
    sample_weight (or None), in one launch."""
    device = _check(logits, targets, sample_weight, [1.0] * len(logits))
    N, H = logits[0].shape[0], len(logits)
    _util.check_device(_OP, logits[0], grad_loss, scale)
    grads = [_util.empty(tuple(x.shape), x.dtype, device) for x in logits]
    need_gw = bool(need_grad_weight and sample_weight is not None)
    grad_w = _util.empty((N,), sample_weight.dtype, device) if need_gw else None
    if N == 0:
        return grads, grad_w
    cfg = tile(max(x.shape[1] for x in logits))
    w = sample_weight if sample_weight is not None else scale
    gw = grad_w if grad_w is not None else scale
    with _util.on_device(device):
        _mhce_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            tuple(logits),
            tuple(x.stride(0) for x in logits),
            tuple(x.stride(1) for x in logits),
            tuple(x.shape[1] for x in logits),
            tuple(targets),
            tuple(y.stride(0) for y in targets),
            tuple(grads),
            w,
            w.stride(0),
            gw,
            scale,
            grad_loss.reshape(()).to(torch.float32),
            N,
            int(ignore_index),
            H=H,
            HAS_W=sample_weight is not None,
            NEED_GW=need_gw,
            **cfg,
        )
    return grads, grad_w
