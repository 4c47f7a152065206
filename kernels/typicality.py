"""Typicality against one prototype per (domain, class) cell, and per-cell prototype sums.

Typicality: one pass over the embeddings. Each program owns BLOCK_N rows and streams them over
D once: it accumulates the squared norm and, for each of the K domains, the dot product with the
unit centre of the row's OWN class in that domain (K dot products per row, not K * M; the centre
rows are gathered from a small float32 table that stays in cache). The epilogue divides by
max(|x|, 1e-8), combines the row's own-domain cosine with the mean over the other domains whose
(k', y) cell is non-empty (DESIGN.md's degenerate-cell contract) and writes t in float32. Nothing
but the [N] output is allocated, so N in the millions streams through in one launch.

Prototype sums: each program owns a chunk of rows and a block of D columns and reduces its rows
per cell locally, as a one-hot [cells x rows] @ [rows x D] product (exact: the one-hot is 0/1,
accumulation is float32), then adds its [cells x D] partial into the float32 sums with atomics;
counts likewise. So each embedding is read once (once per block of 64 cells beyond 64 cells), and
atomics are per chunk, not per row. Sums of different runs may differ in the last bits (atomic
order). Known difference from the reference: a NaN/Inf in an embedding propagates (0 * NaN) to
every cell's sums in its column block, not only to its own cell's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _util

COS_EPS = tl.constexpr(1e-8)  # cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))


@triton.jit
def _typicality_kernel(
    x_ptr, sxn, sxd,
    y_ptr, syn, k_ptr, skn,
    u_ptr,  # unit centres [K, M, D] float32, contiguous
    p_ptr,  # cell present [K, M] int8, contiguous
    out_ptr,  # [N] float32
    N, D, M, alpha,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < N
    y = tl.load(y_ptr + rows * syn, mask=in_n, other=0).to(tl.int64)
    kd = tl.load(k_ptr + rows * skn, mask=in_n, other=0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    arange_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        m2 = in_n[:, None] & (offs_d < D)[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * sxn + offs_d[None, :] * sxd, mask=m2, other=0.0, eviction_policy="evict_first"
        ).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
        for k in tl.static_range(K):
            # The centre table is small (K * M * D floats) and read by every program: keep it cached.
            c = tl.load(u_ptr + (k * M + y)[:, None] * D + offs_d[None, :], mask=m2, other=0.0, eviction_policy="evict_last")
            dot = tl.sum(x * c, axis=1)
            acc = tl.where(kk[None, :] == k, acc + dot[:, None], acc)
    norm = tl.maximum(tl.sqrt(sq), COS_EPS)
    cos = acc / norm[:, None]
    own = tl.sum(tl.where(kk[None, :] == kd[:, None], cos, 0.0), axis=1)
    present = tl.load(p_ptr + kk[None, :] * M + y[:, None], mask=in_n[:, None] & (kk < K)[None, :], other=0)
    others = (present != 0) & (kk[None, :] != kd[:, None])
    n_other = tl.sum(others.to(tl.float32), axis=1)
    other = tl.sum(tl.where(others, cos, 0.0), axis=1) / tl.maximum(n_other, 1.0)
    t = tl.where(n_other > 0, alpha * own + (1.0 - alpha) * other, own)
    tl.store(out_ptr + rows, t, mask=in_n)


@triton.jit
def _prototype_sums_kernel(
    x_ptr, sxn, sxd,
    cell_ptr, scn,
    sums_ptr,  # [C, D] float32, zero-initialised, contiguous
    counts_ptr,  # [C] int64, zero-initialised
    N, D, C, rows_per_prog,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
    row0 = pid_n.to(tl.int64) * rows_per_prog
    arange_n = tl.arange(0, BLOCK_N)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + arange_n
        in_n = rows < N
        cell = tl.load(cell_ptr + rows * scn, mask=in_n, other=-1)
        onehot = cc[:, None] == cell[None, :]  # [BLOCK_C, BLOCK_N]
        x = tl.load(
            x_ptr + rows[:, None] * sxn + offs_d[None, :] * sxd, mask=in_n[:, None] & in_d[None, :], other=0.0,
            eviction_policy="evict_first",
        )
        if NATIVE_DOT:
            # 16-bit inputs on a GPU: 0/1 times a 16-bit value is exact, accumulation is float32.
            acc = tl.dot(onehot.to(x.dtype), x, acc)
        else:
            acc = tl.dot(onehot.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        cnt += tl.sum(onehot.to(tl.int32), axis=1)
    in_c = cc < C
    tl.atomic_add(sums_ptr + cc[:, None].to(tl.int64) * D + offs_d[None, :], acc, mask=in_c[:, None] & in_d[None, :])
    if pid_d == 0:
        tl.atomic_add(counts_ptr + cc, cnt.to(tl.int64), mask=in_c)


def typicality(embeddings: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, unit_centers: torch.Tensor,
               cell_present: torch.Tensor, alpha: float) -> torch.Tensor:
    """t [N] float32. unit_centers [K, M, D] float32 (rows already divided by max(|c|, 1e-8));
    cell_present [K, M] bool. labels/domains must hold in-range indices (checked by the caller)."""
    op = "typicality"
    _util.check_dtype(op, "embeddings", embeddings)
    if embeddings.dim() != 2:
        raise ValueError(f"{op}: embeddings must be [N, D], got {tuple(embeddings.shape)}")
    N, D = embeddings.shape
    K, M, Dc = unit_centers.shape
    if Dc != D or tuple(cell_present.shape) != (K, M) or labels.shape != (N,) or domains.shape != (N,):
        raise ValueError(f"{op}: inconsistent shapes")
    _util.check_device(op, embeddings, labels, domains, unit_centers, cell_present)
    out = _util.empty((N,), torch.float32, embeddings.device)
    if N == 0:
        return out
    if D == 0:
        raise ValueError(f"{op}: embeddings have D = 0")
    u = unit_centers.to(torch.float32).contiguous()
    present = cell_present.to(torch.int8).contiguous()
    block_d = max(16, min(256, _util.next_pow2(D)))
    block_n = max(16, min(128, 4096 // block_d)) if not _util.interpreter() else max(16, min(256, 16384 // block_d))
    grid = (triton.cdiv(N, block_n),)
    _typicality_kernel[grid](
        embeddings, embeddings.stride(0), embeddings.stride(1),
        labels, labels.stride(0), domains, domains.stride(0),
        u, present, out,
        N, D, M, float(alpha),
        K=K, BLOCK_K=max(2, _util.next_pow2(K)), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def prototype_sums(embeddings: torch.Tensor, cells: torch.Tensor, num_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell float32 sums [C, D] and int64 counts [C]; cells must lie in [0, num_cells)."""
    op = "prototype_sums"
    _util.check_dtype(op, "embeddings", embeddings)
    if embeddings.dim() != 2 or cells.shape != (embeddings.shape[0],):
        raise ValueError(f"{op}: expected embeddings [N, D] and cells [N]")
    if cells.dtype.is_floating_point or cells.dtype == torch.bool:
        raise TypeError(f"{op}: cells must be an integer tensor, got {cells.dtype}")
    device = _util.check_device(op, embeddings, cells)
    N, D = embeddings.shape
    C = int(num_cells)
    sums = torch.zeros((C, D), dtype=torch.float32, device=device)
    counts = torch.zeros((C,), dtype=torch.int64, device=device)
    if N == 0 or D == 0 or C == 0:
        return sums, counts
    block_d = max(16, min(128, _util.next_pow2(D)))
    block_c = max(16, min(64, _util.next_pow2(C)))
    block_n = 64 if not _util.interpreter() else 128
    n_d, n_c = triton.cdiv(D, block_d), triton.cdiv(C, block_c)
    target = 8 * _util.num_sms(device)
    n_chunks = max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, n_d * n_c), 65535))
    rows_per_prog = triton.cdiv(triton.cdiv(N, n_chunks), block_n) * block_n
    n_chunks = triton.cdiv(N, rows_per_prog)
    native = device.type == "cuda" and embeddings.dtype in (torch.float16, torch.bfloat16)
    _prototype_sums_kernel[(n_d, n_chunks, n_c)](
        embeddings, embeddings.stride(0), embeddings.stride(1),
        cells, cells.stride(0),
        sums, counts,
        N, D, C, rows_per_prog,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_C=block_c, NATIVE_DOT=native,
        num_warps=4,
    )
    return sums, counts
