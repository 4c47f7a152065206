"""Typicality against one prototype per (domain, class) cell, and per-cell prototype sums.

Typicality: one pass over the embeddings. Each program owns BLOCK_N rows and streams them over
D once. For each D-block it rescales the block by the row's running max |x| (so squares of rows
with |x| >= ~1.8e19 cannot overflow float32, an online rescaling as in a streaming softmax),
accumulates the squared norm and, for each of the K domains, the dot product with the unit centre
of the row's OWN class in that domain (K dot products per row, not K * M; the centre rows are
gathered from a small float32 table that stays in cache). The domain loop is a runtime loop: an
unrolled one let the compiler hoist K gathers at once and spill (255 registers, 96 spilled at
K = 16 on sm_90). The epilogue divides by max(|x|, 1e-8), combines the row's own-domain cosine
with the mean over the other domains whose (k', y) cell is non-empty (docs/design.md's
degenerate-cell contract) and writes t in float32. Nothing but the [N] output is allocated, so N
in the millions streams through in one launch.

Prototype sums: each program owns a chunk of rows and a block of D columns and reduces its rows
per cell locally, as a one-hot [cells x rows] @ [rows x D] product (exact: the one-hot is 0/1,
accumulation is float32), then adds its [cells x D] partial into the float32 sums with atomics;
counts likewise. So each embedding is read once (once per block of 64 cells beyond 64 cells), and
atomics are per chunk, not per row. Sums of different runs may differ in the last bits (atomic
order). Known difference from the reference: a NaN/Inf in an embedding propagates (0 * NaN) to
every cell's sums in its column block, not only to its own cell's.

Offsets: every index multiplied by a stride is int64 first (index * stride of a strided view can
pass 2**31 elements).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import _util

COS_EPS = tl.constexpr(1e-8)  # cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))

# Tile table of the typicality kernel: BLOCK_D by the embedding width, BLOCK_N from BLOCK_D so a
# [BLOCK_N, BLOCK_D] float32 tile is 4096 values (32 per thread with 4 warps), BLOCK_K covers the
# domains (the kernel takes up to MAX_DOMAINS; the dispatch runs the reference beyond).
TYPICALITY_BLOCK_D = (16, 32, 64, 128, 256)
TYPICALITY_ROWS = {16: 128, 32: 128, 64: 64, 128: 32, 256: 16}  # BLOCK_D -> BLOCK_N
TYPICALITY_BLOCK_K = (2, 4, 8, 16, 32, 64)
MAX_DOMAINS = TYPICALITY_BLOCK_K[-1]
NUM_WARPS = 4


def typicality_tile(D: int, K: int) -> dict:
    block_d = _util.fit(D, TYPICALITY_BLOCK_D)
    return dict(
        BLOCK_N=TYPICALITY_ROWS[block_d], BLOCK_D=block_d, BLOCK_K=_util.fit(K, TYPICALITY_BLOCK_K), num_warps=NUM_WARPS
    )


def typicality_tiles() -> list[dict]:
    return [
        dict(BLOCK_N=TYPICALITY_ROWS[d], BLOCK_D=d, BLOCK_K=k, num_warps=NUM_WARPS)
        for d, k in itertools.product(TYPICALITY_BLOCK_D, TYPICALITY_BLOCK_K)
    ]


# Tile table of the prototype sums: a [BLOCK_C, BLOCK_N] one-hot times a [BLOCK_N, BLOCK_D] slab.
# NATIVE_DOT (16-bit inputs) feeds the tensor cores directly; float32 runs an exact ieee dot,
# whose [64, 128] float32 accumulator spilled with 4 warps (224 bytes, sm_90): 64 cells get 8.
SUMS_BLOCK_D = (16, 32, 64, 128)
SUMS_WARPS = {16: 4, 32: 4, 64: 8}  # BLOCK_C -> num_warps
SUMS_BLOCK_C = tuple(SUMS_WARPS)
SUMS_BLOCK_N = 64


def sums_tile(D: int, C: int, dtype: torch.dtype) -> dict:
    block_c = _util.fit(C, SUMS_BLOCK_C)
    return dict(
        BLOCK_N=SUMS_BLOCK_N,
        BLOCK_D=_util.fit(D, SUMS_BLOCK_D),
        BLOCK_C=block_c,
        NATIVE_DOT=dtype in (torch.float16, torch.bfloat16),
        num_warps=SUMS_WARPS[block_c],
    )


def sums_tiles() -> list[dict]:
    return [
        dict(BLOCK_N=SUMS_BLOCK_N, BLOCK_D=d, BLOCK_C=c, NATIVE_DOT=native, num_warps=SUMS_WARPS[c])
        for d, c, native in itertools.product(SUMS_BLOCK_D, SUMS_BLOCK_C, (False, True))
    ]


@triton.jit
def _typicality_kernel(
    x_ptr,
    stride_x_n,
    stride_x_d,  # embeddings [N, D], any strides, float32/float16/bfloat16
    labels_ptr,
    stride_labels,  # [N] integer class of each row, in [0, M)
    domains_ptr,
    stride_domains,  # [N] integer domain of each row, in [0, K)
    unit_ptr,  # unit centres [K, M, D] float32, contiguous
    present_ptr,  # [K, M] int8, contiguous: 1 where the (k, m) cell has rows
    out_ptr,  # t [N] float32
    N,
    D,
    K,
    M,
    alpha,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < N
    y = tl.load(labels_ptr + rows * stride_labels, mask=in_n, other=0).to(tl.int64)
    kd = tl.load(domains_ptr + rows * stride_domains, mask=in_n, other=0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    dots = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # x . u[k, y] / scale, per domain k
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)  # |x / scale|^2
    scale = tl.zeros([BLOCK_N], dtype=tl.float32)  # running max |x| of the row
    arange_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + arange_d).to(tl.int64)
        m2 = in_n[:, None] & (offs_d < D)[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_n + offs_d[None, :] * stride_x_d,
            mask=m2,
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        new_scale = tl.maximum(scale, tl.max(tl.abs(x), axis=1))
        inv = tl.where(new_scale > 0, 1.0 / new_scale, 0.0)
        ratio = scale * inv  # old / new scale, 0 before the first nonzero block
        xs = x * inv[:, None]
        sq = sq * ratio * ratio + tl.sum(xs * xs, axis=1)
        dots = dots * ratio[:, None]
        scale = new_scale
        for k in range(K):
            # The centre table is small (K * M * D floats) and read by every program: keep it cached.
            c = tl.load(
                unit_ptr + (k * M + y)[:, None] * D + offs_d[None, :], mask=m2, other=0.0, eviction_policy="evict_last"
            )
            dots = tl.where(kk[None, :] == k, dots + tl.sum(xs * c, axis=1)[:, None], dots)
    # |x| = scale * sqrt(sq), so max(|x|, eps) / scale = max(sqrt(sq), eps / scale); an all-zero
    # row has scale 0, eps / 0 = inf and cosines 0.
    cos = dots / tl.maximum(tl.sqrt(sq), COS_EPS / scale)[:, None]
    own = tl.sum(tl.where(kk[None, :] == kd[:, None], cos, 0.0), axis=1)
    present = tl.load(present_ptr + kk[None, :] * M + y[:, None], mask=in_n[:, None] & (kk < K)[None, :], other=0)
    others = (present != 0) & (kk[None, :] != kd[:, None])
    n_other = tl.sum(others.to(tl.float32), axis=1)
    other = tl.sum(tl.where(others, cos, 0.0), axis=1) / tl.maximum(n_other, 1.0)
    t = tl.where(n_other > 0, alpha * own + (1.0 - alpha) * other, own)
    tl.store(out_ptr + rows, t, mask=in_n)


@triton.jit
def _prototype_sums_kernel(
    x_ptr,
    stride_x_n,
    stride_x_d,  # embeddings [N, D], any strides
    cells_ptr,
    stride_cells,  # [N] integer cell of each row (domain * M + label), in [0, C)
    sums_ptr,  # [C, D] float32, zero-initialised, contiguous
    counts_ptr,  # [C] int64, zero-initialised
    N,
    D,
    C,
    rows_per_prog,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    in_d = offs_d < D
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
    row0 = pid_n.to(tl.int64) * rows_per_prog
    arange_n = tl.arange(0, BLOCK_N)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + arange_n
        in_n = rows < N
        cell = tl.load(cells_ptr + rows * stride_cells, mask=in_n, other=-1)
        onehot = cc[:, None] == cell[None, :]  # [BLOCK_C, BLOCK_N]
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_n + offs_d[None, :] * stride_x_d,
            mask=in_n[:, None] & in_d[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        if NATIVE_DOT:
            # 16-bit inputs: 0/1 times a 16-bit value is exact, accumulation is float32.
            acc = tl.dot(onehot.to(x.dtype), x, acc)
        else:
            acc = tl.dot(onehot.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        cnt += tl.sum(onehot.to(tl.int32), axis=1)
    in_c = cc < C
    tl.atomic_add(sums_ptr + cc[:, None].to(tl.int64) * D + offs_d[None, :], acc, mask=in_c[:, None] & in_d[None, :])
    if pid_d == 0:
        tl.atomic_add(counts_ptr + cc, cnt.to(tl.int64), mask=in_c)


def typicality(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    unit_centers: torch.Tensor,
    cell_present: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
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
    if K > MAX_DOMAINS:
        raise ValueError(f"{op}: the kernel takes at most {MAX_DOMAINS} domains, got {K}")
    device = _util.check_device(op, embeddings, labels, domains, unit_centers, cell_present)
    out = _util.empty((N,), torch.float32, embeddings.device)
    if N == 0:
        return out
    if D == 0:
        raise ValueError(f"{op}: embeddings have D = 0")
    u = unit_centers.to(torch.float32).contiguous()
    present = cell_present.to(torch.int8).contiguous()
    cfg = typicality_tile(D, K)
    with _util.on_device(device):
        _typicality_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            embeddings,
            embeddings.stride(0),
            embeddings.stride(1),
            labels,
            labels.stride(0),
            domains,
            domains.stride(0),
            u,
            present,
            out,
            N,
            D,
            K,
            M,
            float(alpha),
            **cfg,
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
    cfg = sums_tile(D, C, embeddings.dtype)
    if _util.interpreter() and embeddings.dtype == torch.bfloat16:
        # The interpreter's tl.dot gives garbage for bfloat16 operands (float16 is exact there):
        # it runs the float32 dot instead; a GPU runs the bfloat16 tensor-core path.
        cfg["NATIVE_DOT"] = False
    block_n, block_d, block_c = cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["BLOCK_C"]
    n_d, n_c = triton.cdiv(D, block_d), triton.cdiv(C, block_c)
    target = 8 * _util.num_sms(device)
    n_chunks = max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, n_d * n_c), 65535))
    rows_per_prog = triton.cdiv(triton.cdiv(N, n_chunks), block_n) * block_n
    n_chunks = triton.cdiv(N, rows_per_prog)
    with _util.on_device(device):
        _prototype_sums_kernel[(n_d, n_chunks, n_c)](
            embeddings,
            embeddings.stride(0),
            embeddings.stride(1),
            cells,
            cells.stride(0),
            sums,
            counts,
            N,
            D,
            C,
            rows_per_prog,
            **cfg,
        )
    return sums, counts
