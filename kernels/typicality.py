"""Typicality against one prototype per (domain, class) cell, and per-cell prototype sums.

Typicality as a skinny GEMM (``_typicality_kernel``, up to MAX_GEMM_CELLS = 64 cells)
---------------------------------------------------------------------------------------
t needs, per row i, the cosines of x_i with the unit centres u[k, y_i] of its own class in every
domain k. With C = K * M cells (a few dozen in MFT) it is cheaper to compute x_i . u for ALL cells
on the tensor cores and keep the K needed columns than to gather K centre rows per row (the
previous kernel, kept below for more cells): one program owns BLOCK_N rows and streams them over D
once, each step one ``tl.dot`` of an [BLOCK_N, BLOCK_D] tile of x with the [BLOCK_D, CELLS] tile
of the centre matrix U (column k * M + m holds u[k, m]; CELLS = C padded with zero columns to a
power of two >= 16, as tl.dot needs), accumulated in float32, plus the row's squared norm
sum_d x_d^2. The epilogue divides by |x| and, per row, picks the column k_i * M + y_i (own) and
the columns k' * M + y_i of the other domains whose cell is non-empty (docs/design.md's
degenerate-cell contract), then writes t [N] float32. Nothing else is written.

Why this is exact enough without rescaling. |x . u| <= |x| |u| = |x| (Cauchy-Schwarz; |u| = 1 or
0), so the dot products cannot overflow float32 when the squared norm does not: only sum_d x_d^2
can. The previous kernel rescaled every D block by the row's running max |x| (an online max, as in
a streaming softmax), which cost more instructions than the whole product. Here the squared norm
is accumulated plainly. Rows in [eps^2, inf) have max(|x|, eps) = |x| (eps = 1e-8). A program
with a row outside (zero and tiny rows, rows with |x| >= ~1.8e19, NaN/Inf) appends its id to a
device-side list (an integer atomic counter; the order of the list changes no result), and a
second launch, ``_typicality_exact_kernel`` on a fixed grid of one program per SM, rewrites those
rows: a pass for max|x_i| and sum x_i^2, then the same GEMM on x_i * s_i with s_i the power of two
that brings max|x_i| into [1, 4) (so the scaling itself is exact), and
cos = (x s . u) / max(|x s|, eps s). It reads the count on the device (no host read) and exits
at once when the list is empty. Kept out of the GEMM kernel, the exact path's code costs it
nothing: with it inside (a branch per program) the kernel took 146 instead of 80 registers (bf16)
and its static SASS count included the branch's loops.

Precision of the products. U is split on the host into U_hi + U_lo in the MMA's operand type
(``_centre_matrix``). float16/bfloat16 embeddings are exact MMA operands: two MMAs (x U_hi +
x U_lo) into one accumulator, U carried to about 16 (bf16) or 22 (fp16) bits. float32 embeddings
are split in the kernel as x = x_hi + x_lo, x_hi rounded to tf32 by integer ops on its bits (add
half an ulp, clear the low 13 bits: 2 instructions per element) and x_lo = x - x_hi exact; three
tf32 MMAs x_hi U_hi + x_hi U_lo + x_lo U_hi (the tensor cores truncate x_lo to tf32; x_lo U_lo,
< 2^-21 |x_d u_d|, is dropped): about 2^-21 relative per product, against 2^-11 for plain tf32.
Triton's own ``tf32x3`` does the same but rounds x and U with cvt.rna.tf32 in every step, several
SASS instructions per value on sm_90, where U's rounding here is done once on the host. The
FLOPs are negligible at C <= 64: 2 * 2 * CELLS per element (16-bit), about 0.26 ms at 4M x 768 on
an H100-class GPU, under the 1.5 ms memory time. The Triton interpreter's tl.dot is wrong for
bfloat16 operands, so there (only there, DOT_FP32) they are converted to float32 first.

Tuning (sm_90, read from the SASS; numbers in benchmarks/results once measured). Tiles are data
(GEMM_* below): BLOCK_D keeps a tile row at <= 128 bytes (64 bf16, 32 fp32 columns), so a
[128, BLOCK_D] stage is 16 KB, and ``tl.range(..., num_stages=GEMM_STAGES)`` turns the loads of x
and U into 16-byte asynchronous copies GEMM_STAGES - 1 steps ahead (32 KB of x in flight per
program; 45 KB of shared memory). fp32 with BLOCK_D = 64 spilled (255 registers). BLOCK_N is 128
(64 at 64 cells, so the [BLOCK_N, CELLS] float32 accumulator stays at <= 32 registers per thread
with 4 warps). U is stored transposed, [2, CELLS, D_PAD] (D contiguous: the K-major operand the
tf32 MMA needs, loaded with 16-byte copies), zero-padded to D_PAD, a multiple of BLOCK_D, so its
loads are never masked; every program re-reads it from L2 (1/8 of the bytes of x at 16 cells and
BLOCK_N = 128). The pointers advance by BLOCK_D columns each step, EVEN_D (D a multiple of
BLOCK_D) drops the column mask, and the squares are summed per group of VEC columns that one
thread holds (a 16-byte load), so the cross-thread sum runs once after the loop, not per step
(24 shuffles per step before). ``tl.assume(D > 0)`` removes the loop's zero-trip path, whose
moves into the accumulator registers made ptxas serialise the MMAs (C7515).

More than 64 cells (``_typicality_gather_kernel``): the FLOPs of the all-cells product grow with
K * M while only K columns are used, so there the previous kernel runs: per D block the row is
rescaled by its running max |x| and dotted with the gathered unit centres of its own class in each
domain (K dots per row, a runtime loop: an unrolled one spilled at K = 16), then the same epilogue.

Prototype sums (``_prototype_sums_kernel``): each program owns a chunk of rows, a block of D
columns and a block of cells, and reduces its rows per cell as a one-hot [cells x rows] @ [rows x
D] product (exact: the one-hot is 0/1, accumulation is float32), then writes its [cells x D]
partial to its own slot of a [chunks, C, D] float32 buffer; ``_sum_chunks_kernel`` then adds the
chunks' partials in chunk order. No float atomics, so the sums are the same bits on every run
(the counts are integer atomics, exact in any order). With one chunk the partial is the result.
Each embedding is read once (once per block of 64 cells beyond 64 cells). Known difference from the
reference: a NaN/Inf in an embedding propagates (0 * NaN) to every cell's sums in its column
block, not only to its own cell's.

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
# The fast path's rows: squared norm in [eps^2, inf), where max(|x|, eps) = |x| and nothing overflowed.
MIN_FAST_SQUARE_NORM = tl.constexpr(1e-16)

# Tile table of the GEMM kernel. CELLS = K * M padded to a power of two >= 16 (tl.dot's minimum);
# CELLS -> BLOCK_N keeps the float32 accumulator at <= 32 registers per thread with 4 warps;
# BLOCK_D by the embeddings' element size (a tile row <= 128 bytes): the largest that divides D.
# When none does, the loop masks columns, and the masks of every stage cost registers: at D = 700
# the [128, 64] and [128, 32] tiles spilled (255 registers), and float32 [64, 32] at 64 cells.
GEMM_CELLS = (16, 32, 64)
GEMM_ROWS = {16: 128, 32: 128, 64: 64}  # CELLS -> BLOCK_N
GEMM_BLOCK_D = {4: (16, 32), 2: (16, 32, 64)}  # element size -> BLOCK_D choices
GEMM_MASKED_BLOCK_D = {4: (16,), 2: (16, 32)}  # D a multiple of none of the above
GEMM_MASKED_ROWS = 64
GEMM_STAGES = 3
MAX_GEMM_CELLS = GEMM_CELLS[-1]

# Tile table of the gather kernel (more than MAX_GEMM_CELLS cells): BLOCK_D by the embedding width,
# BLOCK_N from BLOCK_D so a [BLOCK_N, BLOCK_D] float32 tile is 4096 values (32 per thread with 4
# warps), BLOCK_K covers the domains (up to MAX_DOMAINS; the dispatch runs the reference beyond).
GATHER_BLOCK_D = (16, 32, 64, 128, 256)
GATHER_ROWS = {16: 128, 32: 128, 64: 64, 128: 32, 256: 16}  # BLOCK_D -> BLOCK_N
GATHER_BLOCK_K = (2, 4, 8, 16, 32, 64)
MAX_DOMAINS = GATHER_BLOCK_K[-1]
NUM_WARPS = 4


def gemm_tile(D: int, cells: int, dtype: torch.dtype) -> dict:
    """The GEMM kernel's tile for D columns, ``cells`` = K * M <= MAX_GEMM_CELLS and the embeddings' dtype."""
    block_cells = _util.fit(cells, GEMM_CELLS)
    dividing = [c for c in GEMM_BLOCK_D[dtype.itemsize] if D % c == 0]
    rows = GEMM_ROWS[block_cells]
    if dividing:
        block_d, even_d = max(dividing), True
    else:
        block_d, even_d, rows = _util.fit(D, GEMM_MASKED_BLOCK_D[dtype.itemsize]), False, min(rows, GEMM_MASKED_ROWS)
    return dict(BLOCK_N=rows, BLOCK_D=block_d, CELLS=block_cells, EVEN_D=even_d, num_warps=NUM_WARPS)


def gemm_tiles() -> list[dict]:
    """Every tile the GEMM kernel can take, each with a width D that picks it and the dtype whose
    element size does: D = BLOCK_D (a multiple), and odd D (a column mask)."""
    widths = {
        dtype: (*GEMM_BLOCK_D[dtype.itemsize], *(d - 3 for d in GEMM_MASKED_BLOCK_D[dtype.itemsize]))
        for dtype in (torch.float32, torch.bfloat16)
    }
    return [
        dict(dtype=dtype, D=D, **gemm_tile(D, cells, dtype))
        for dtype, ds in widths.items()
        for D, cells in itertools.product(ds, GEMM_CELLS)
    ]


def gather_tile(D: int, K: int) -> dict:
    block_d = _util.fit(D, GATHER_BLOCK_D)
    return dict(
        BLOCK_N=GATHER_ROWS[block_d], BLOCK_D=block_d, BLOCK_K=_util.fit(K, GATHER_BLOCK_K), num_warps=NUM_WARPS
    )


def gather_tiles() -> list[dict]:
    return [
        dict(BLOCK_N=GATHER_ROWS[d], BLOCK_D=d, BLOCK_K=k, num_warps=NUM_WARPS)
        for d, k in itertools.product(GATHER_BLOCK_D, GATHER_BLOCK_K)
    ]


# Tile table of the prototype sums: a [BLOCK_C, BLOCK_N] one-hot times a [BLOCK_N, BLOCK_D] slab.
# NATIVE_DOT (16-bit inputs) feeds the tensor cores directly; float32 runs an exact ieee dot,
# whose [64, 128] float32 accumulator spilled with 4 warps (224 bytes, sm_90): 64 cells get 8.
SUMS_BLOCK_D = (16, 32, 64, 128)
SUMS_WARPS = {16: 4, 32: 4, 64: 8}  # BLOCK_C -> num_warps
SUMS_BLOCK_C = tuple(SUMS_WARPS)
SUMS_BLOCK_N = 64
CHUNK_SUM_BLOCK = 1024  # elements of the [C * D] sums per program of the chunk reduction


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
def _cell_dots(
    x_ptr,
    stride_x_col,
    row_offsets,  # [BLOCK_N] int64: row index * stride_x_row
    in_rows,  # [BLOCK_N] bool
    centres_ptr,  # U^T [2, CELLS, D_PAD] = (hi, lo), contiguous
    D,
    D_PAD,
    row_scale,  # [BLOCK_N] float32 powers of two (SCALED only)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CELLS: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SCALED: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """(x s) @ U [BLOCK_N, CELLS] and |x s|^2 [BLOCK_N] in float32, s = row_scale if SCALED else 1."""
    arange_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + row_offsets[:, None] + arange_d[None, :].to(tl.int64) * stride_x_col
    u_ptrs = centres_ptr + tl.arange(0, CELLS)[None, :] * D_PAD + arange_d[:, None]  # [BLOCK_D, CELLS] of U^T
    x_step = tl.full([], BLOCK_D, tl.int64) * stride_x_col
    tl.assume(D > 0)  # the loop runs: no zero-trip path that would move the accumulators (it serialised the MMAs)
    dots = tl.zeros([BLOCK_N, CELLS], dtype=tl.float32)
    # Squares are summed per (row, group of VEC columns) in the loop: a thread holds VEC
    # consecutive columns of a row (one 16-byte load), so this sum stays in its registers; the
    # cross-thread sum over the groups runs once, after the loop.
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    square_parts = tl.zeros([BLOCK_N, BLOCK_D // VEC], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
        if EVEN_D:
            mask = in_rows[:, None]
        else:
            mask = in_rows[:, None] & (d0 + arange_d < D)[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        if SCALED:
            # times a power of two: exact, and max|x s| in [1, 4) so nothing overflows below
            x = (x.to(tl.float32) * row_scale[:, None]).to(x.dtype)
        xf = x.to(tl.float32)
        square_parts += tl.sum(tl.reshape(xf * xf, [BLOCK_N, BLOCK_D // VEC, VEC]), axis=2)
        u_hi = tl.load(u_ptrs)
        u_lo = tl.load(u_ptrs + CELLS * D_PAD)
        if x.dtype == tl.float32:
            # x = x_hi + x_lo with x_hi rounded to tf32 (10 mantissa bits, ties away; exact
            # subtraction); the MMA truncates x_lo to tf32. x_lo * u_lo (< 2^-21 |x u|) is dropped.
            x_hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
            x_lo = x - x_hi
            dots = tl.dot(x_hi, u_hi, dots, input_precision="tf32")
            dots = tl.dot(x_hi, u_lo, dots, input_precision="tf32")
            dots = tl.dot(x_lo, u_hi, dots, input_precision="tf32")
        elif DOT_FP32:
            dots = tl.dot(xf, u_hi.to(tl.float32), dots, input_precision="ieee")
            dots = tl.dot(xf, u_lo.to(tl.float32), dots, input_precision="ieee")
        else:
            dots = tl.dot(x, u_hi, dots)
            dots = tl.dot(x, u_lo, dots)
        x_ptrs += x_step
        u_ptrs += BLOCK_D
    return dots, tl.sum(square_parts, axis=1)


@triton.jit
def _fast_path(square_norm):
    """Rows whose squared norm is in [eps^2, inf): max(|x|, eps) = |x| and nothing overflowed."""
    return (square_norm >= MIN_FAST_SQUARE_NORM) & (square_norm < float("inf"))


@triton.jit
def _typicality_epilogue(
    dots, square_norm, scale, rows, in_rows, store, labels_ptr, stride_labels, domains_ptr, stride_domains,
    cell_present_ptr, out_ptr, M, num_cells, alpha, CELLS: tl.constexpr,
):  # fmt: skip
    """t of the rows from (x s) . u for every cell, |x s|^2 and s; stored where ``store``."""
    # cos = (x s . u) / (max(|x|, eps) s) = (x s . u) / max(|x s|, eps s)
    cos = dots / tl.maximum(tl.sqrt(square_norm), COS_EPS * scale)[:, None]
    y = tl.load(labels_ptr + rows * stride_labels, mask=in_rows, other=0).to(tl.int32)
    k = tl.load(domains_ptr + rows * stride_domains, mask=in_rows, other=0).to(tl.int32)
    cells = tl.arange(0, CELLS)
    cell_domain = cells // M
    cell_class = cells - cell_domain * M
    present = tl.load(cell_present_ptr + cells, mask=cells < num_cells, other=0) != 0
    own = tl.sum(tl.where(cells[None, :] == (k * M + y)[:, None], cos, 0.0), axis=1)
    others = (cell_class[None, :] == y[:, None]) & (cell_domain[None, :] != k[:, None]) & present[None, :]
    n_other = tl.sum(others.to(tl.float32), axis=1)
    other = tl.sum(tl.where(others, cos, 0.0), axis=1) / tl.maximum(n_other, 1.0)
    t = tl.where(n_other > 0, alpha * own + (1.0 - alpha) * other, own)
    tl.store(out_ptr + rows, t, mask=store)


@triton.jit
def _typicality_kernel(
    x_ptr,
    stride_x_row,
    stride_x_col,  # embeddings [N, D], any strides, float32/float16/bfloat16
    labels_ptr,
    stride_labels,  # [N] integer class of each row, in [0, M)
    domains_ptr,
    stride_domains,  # [N] integer domain of each row, in [0, K)
    centres_ptr,  # U^T [2, CELLS, D_PAD] = (hi, lo), contiguous: row k * M + m is the unit centre u[k, m]
    cell_present_ptr,  # [K * M] int8: 1 where the (k, m) cell has rows
    out_ptr,  # t [N] float32
    exact_count_ptr,  # [1] int32, zero before the GEMM kernel: programs that need the exact path
    exact_programs_ptr,  # [programs] int32: their ids, first exact_count entries, in any order
    N,
    D,
    D_PAD,  # D rounded up to a multiple of BLOCK_D (U's zero padding)
    M,
    num_cells,  # K * M
    alpha,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CELLS: tl.constexpr,  # num_cells padded to a power of two >= 16 (zero centres)
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no column mask
    DOT_FP32: tl.constexpr,  # interpreter only: 16-bit operands converted to float32 for tl.dot
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    dots, square_norm = _cell_dots(
        x_ptr, stride_x_col, rows * stride_x_row, in_rows, centres_ptr, D, D_PAD, 1.0,
        BLOCK_N, BLOCK_D, CELLS, EVEN_D, DOT_FP32, False, NUM_STAGES,
    )  # fmt: skip
    fast = _fast_path(square_norm)
    if tl.min((fast | ~in_rows).to(tl.int32), axis=0) == 0:
        # A row for the exact path: list this program (integer atomics; the list order does not
        # change any result), and _typicality_exact_kernel rewrites those rows.
        tl.store(exact_programs_ptr + tl.atomic_add(exact_count_ptr, 1), pid)
    _typicality_epilogue(
        dots, square_norm, 1.0, rows, in_rows, in_rows, labels_ptr, stride_labels, domains_ptr, stride_domains,
        cell_present_ptr, out_ptr, M, num_cells, alpha, CELLS,
    )  # fmt: skip


@triton.jit
def _typicality_exact_kernel(
    x_ptr,
    stride_x_row,
    stride_x_col,  # embeddings [N, D], any strides, float32/float16/bfloat16
    labels_ptr,
    stride_labels,  # [N] integer class of each row, in [0, M)
    domains_ptr,
    stride_domains,  # [N] integer domain of each row, in [0, K)
    centres_ptr,  # U^T [2, CELLS, D_PAD] = (hi, lo), contiguous: row k * M + m is the unit centre u[k, m]
    cell_present_ptr,  # [K * M] int8: 1 where the (k, m) cell has rows
    out_ptr,  # t [N] float32
    exact_count_ptr,  # [1] int32, zero before the GEMM kernel: programs that need the exact path
    exact_programs_ptr,  # [programs] int32: their ids, first exact_count entries, in any order
    N,
    D,
    D_PAD,  # D rounded up to a multiple of BLOCK_D (U's zero padding)
    M,
    num_cells,  # K * M
    alpha,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CELLS: tl.constexpr,  # num_cells padded to a power of two >= 16 (zero centres)
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no column mask
    DOT_FP32: tl.constexpr,  # interpreter only: 16-bit operands converted to float32 for tl.dot
    NUM_STAGES: tl.constexpr,
):
    """The exact path: for each program listed by _typicality_kernel (a fixed grid strides over
    the list), max|x| and sum x^2 per row, then the GEMM on x * s with s = 2^(127 - e), e the
    biased exponent of max|x|, and the epilogue for the rows off the fast path."""
    arange_d = tl.arange(0, BLOCK_D)
    for i in range(tl.program_id(0), tl.load(exact_count_ptr), tl.num_programs(0)):
        pid = tl.load(exact_programs_ptr + i)
        rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        row_offsets = rows * stride_x_row
        max_abs = tl.zeros([BLOCK_N], dtype=tl.float32)
        square_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = (d0 + arange_d).to(tl.int64)
            x = tl.load(
                x_ptr + row_offsets[:, None] + offs_d[None, :] * stride_x_col,
                mask=in_rows[:, None] & (offs_d < D)[None, :],
                other=0.0,
            ).to(tl.float32)
            max_abs = tl.maximum(max_abs, tl.max(tl.abs(x), axis=1))
            square_norm += tl.sum(x * x, axis=1)
        biased_exponent = max_abs.to(tl.int32, bitcast=True) >> 23  # 255 for Inf/NaN: they stay non-finite
        scale = (tl.maximum(254 - biased_exponent, 1) << 23).to(tl.float32, bitcast=True)
        dots, scaled_square_norm = _cell_dots(
            x_ptr, stride_x_col, row_offsets, in_rows, centres_ptr, D, D_PAD, scale,
            BLOCK_N, BLOCK_D, CELLS, EVEN_D, DOT_FP32, True, 1,
        )  # fmt: skip
        _typicality_epilogue(
            dots, scaled_square_norm, scale, rows, in_rows, in_rows & ~_fast_path(square_norm), labels_ptr,
            stride_labels, domains_ptr, stride_domains, cell_present_ptr, out_ptr, M, num_cells, alpha, CELLS,
        )  # fmt: skip


@triton.jit
def _typicality_gather_kernel(
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
    partials_ptr,  # [chunks, C, D] float32, contiguous: this program's chunk writes slot pid_n
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
    partial = partials_ptr + pid_n.to(tl.int64) * C * D + cc[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(partial, acc, mask=in_c[:, None] & in_d[None, :])
    if pid_d == 0:
        tl.atomic_add(counts_ptr + cc, cnt.to(tl.int64), mask=in_c)  # integers: exact in any order


@triton.jit
def _sum_chunks_kernel(
    partials_ptr,  # [chunks, size] float32, contiguous
    out_ptr,  # [size] float32
    chunks,
    size,
    BLOCK: tl.constexpr,
):
    """out = ((partials[0] + partials[1]) + partials[2]) + ...: a fixed order, the same bits on every run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_size = offs < size
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for chunk in range(chunks):
        total += tl.load(partials_ptr + chunk * size + offs, mask=in_size, other=0.0)
    tl.store(out_ptr + offs, total, mask=in_size)


def _centre_matrix(unit_centers: torch.Tensor, dtype: torch.dtype, cfg: dict) -> torch.Tensor:
    """U^T [2, CELLS, D_PAD] = (hi, lo): unit centre (k, m) in row k * M + m, zero rows up to
    CELLS and zero columns up to D_PAD (a multiple of BLOCK_D). hi is U rounded to the MMA's operand
    type (tf32 values in float32 for float32 embeddings, else their 16-bit dtype), lo = U - hi
    likewise, so hi + lo carries U to 2^-21 (tf32), 2^-16 (bfloat16) or 2^-22 (float16, bar
    subnormals) relative."""
    K, M, D = unit_centers.shape
    d_pad = triton.cdiv(D, cfg["BLOCK_D"]) * cfg["BLOCK_D"]
    u = torch.zeros((cfg["CELLS"], d_pad), dtype=torch.float32, device=unit_centers.device)
    u[: K * M, :D] = unit_centers.reshape(K * M, D)
    hi = _round_to_tf32(u) if dtype == torch.float32 else u.to(dtype).float()
    lo = u - hi
    if dtype == torch.float32:
        lo = _round_to_tf32(lo)
    return torch.stack([hi, lo]).to(dtype)


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 10 mantissa bits (tf32), ties away from zero, as the kernel rounds x_hi."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def typicality(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    unit_centers: torch.Tensor,
    cell_present: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """t [N] float32. unit_centers [K, M, D] float32 (rows already divided by max(|c|, 1e-8));
    cell_present [K, M] bool. labels/domains must hold in-range indices (checked by the caller).
    K * M <= MAX_GEMM_CELLS runs the GEMM kernel, more cells the gather kernel."""
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
    u = unit_centers.to(torch.float32)
    present = cell_present.to(torch.int8).contiguous()
    rows = (embeddings, embeddings.stride(0), embeddings.stride(1))
    indices = (labels, labels.stride(0), domains, domains.stride(0))
    if K * M <= MAX_GEMM_CELLS:
        cfg = gemm_tile(D, K * M, embeddings.dtype)
        centres = _centre_matrix(u, embeddings.dtype, cfg)
        interpreted_bf16 = _util.interpreter() and embeddings.dtype == torch.bfloat16
        programs = triton.cdiv(N, cfg["BLOCK_N"])
        exact_count = torch.zeros((1,), dtype=torch.int32, device=device)
        exact_programs = torch.empty((programs,), dtype=torch.int32, device=device)
        args = (*rows, *indices, centres, present, out, exact_count, exact_programs, N, D, centres.shape[2])
        args = (*args, M, K * M, float(alpha))
        with _util.on_device(device):
            _typicality_kernel[(programs,)](*args, DOT_FP32=interpreted_bf16, NUM_STAGES=GEMM_STAGES, **cfg)
            # No host read: a fixed grid reads the count on the device (and exits when it is 0).
            exact_grid = min(programs, _util.num_sms(device))
            _typicality_exact_kernel[(exact_grid,)](*args, DOT_FP32=interpreted_bf16, NUM_STAGES=1, **cfg)
        return out
    cfg = gather_tile(D, K)
    with _util.on_device(device):
        _typicality_gather_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            *rows, *indices, u.contiguous(), present, out, N, D, K, M, float(alpha), **cfg
        )
    return out


def prototype_sums(embeddings: torch.Tensor, cells: torch.Tensor, num_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell float32 sums [C, D] and int64 counts [C]; cells must lie in [0, num_cells).
    Deterministic: the same bits on every run (fixed-order reduction of per-chunk partials)."""
    op = "prototype_sums"
    _util.check_dtype(op, "embeddings", embeddings)
    if embeddings.dim() != 2 or cells.shape != (embeddings.shape[0],):
        raise ValueError(f"{op}: expected embeddings [N, D] and cells [N]")
    if cells.dtype.is_floating_point or cells.dtype == torch.bool:
        raise TypeError(f"{op}: cells must be an integer tensor, got {cells.dtype}")
    device = _util.check_device(op, embeddings, cells)
    N, D = embeddings.shape
    C = int(num_cells)
    counts = torch.zeros((C,), dtype=torch.int64, device=device)
    if N == 0 or D == 0 or C == 0:
        return torch.zeros((C, D), dtype=torch.float32, device=device), counts
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
    # Every (chunk, cell, column) slot is written by exactly one program: no zero-fill needed.
    partials = _util.empty((n_chunks, C, D), torch.float32, device)
    with _util.on_device(device):
        _prototype_sums_kernel[(n_d, n_chunks, n_c)](
            embeddings,
            embeddings.stride(0),
            embeddings.stride(1),
            cells,
            cells.stride(0),
            partials,
            counts,
            N,
            D,
            C,
            rows_per_prog,
            **cfg,
        )
        if n_chunks == 1:
            return partials[0], counts
        sums = _util.empty((C, D), torch.float32, device)
        _sum_chunks_kernel[(triton.cdiv(C * D, CHUNK_SUM_BLOCK),)](
            partials, sums, n_chunks, C * D, BLOCK=CHUNK_SUM_BLOCK, num_warps=NUM_WARPS
        )
    return sums, counts
