"""Weighted multi-head cross-entropy: a one-launch forward that also writes the gradient, and a
backward that only scales it.

    loss = sum_h s_h * sum_{i kept in h} t_i CE_h,i,   s_h = w_h / max(kept_h, 1),
    CE_h,i = lse_h,i - x_h,i,y_h,i,   lse_h,i = log sum_c exp(x_h,i,c),   kept: y_h,i != ignore_index,

in float32 for any logits dtype (docs/design.md, section 2).

Forward (``_mhce_fwd_kernel``, one launch). The H heads (different class counts C_h, dtypes and
strides) travel as tuples of pointers. A persistent grid of P programs (``programs``: about 4 per
SM) walks the [BLOCK_N]-row blocks pid, pid + P, ...; per block it issues every head's target and
logit loads first, then the math, and adds t_i CE_h,i and the kept flags into per-row registers.
Each program reduces those once, at its end, into its partial (sum of t CE, kept count) per head,
then takes a ticket (an atomic counter); the program that draws the last ticket sums the P
partials in program order, so the loss has the same bits on every run, writes the loss and s_h,
and resets the counter for the next launch. The counter and partials live in a workspace cached
per (device, stream), so a call allocates only its outputs.

A head with C_h <= MAX_TILE_C is one [BLOCK_N, BLOCK_C_h] tile in registers: a plain max / sum
log-sum-exp, and the target logit picked from the tile (``where(cols == y)``), never gathered
from memory again. BLOCK_C_h = C_h rounded up to a power of two; C_h and the row stride of a
contiguous head are compile-time constants, so for C_h in (2, 4, 8) every thread owns whole rows
(one vector load per row, no shuffles in the row reductions). Wider heads stream the classes in
MAX_TILE_C chunks with an online log-sum-exp, picking the target logit chunk by chunk.

Gradient. kept_h counts targets, so s_h is a constant and
    dL/dx_h,i,c = g s_h t_i (softmax(x_h,i)_c - [c == y_h,i])   for kept rows, 0 for ignored rows
    dL/dt_i     = g sum_h s_h [i kept in h] CE_h,i
(g: the incoming gradient of the loss). softmax is in the forward's registers, but s_h needs
every program's kept count and g comes later, so when a head's gradient will be needed the
forward stores G_h,i,c = t_i (softmax - onehot) (0 for ignored rows) into a contiguous [N, C_h]
tensor of the logits' dtype, and, when t needs a gradient, CE_h,i [H, N] float32 (0 when
ignored). The backward (``_mhce_bwd_kernel``, one launch) multiplies G_h by g s_h in place and
forms dL/dt from CE. For 16-bit logits this rounds twice (G, then g s_h G) where the reference
rounds once: at most one extra half-ulp. Heads whose logits need no gradient write nothing.

Tuning (read from the sm_90 SASS of Triton 3.9, benchmarks/kernel_resources.py; 2**20 rows,
heads (3, 4, 4, 4) bf16): BLOCK_N = 128 rows for 4 warps is one row per thread, the same row
mapping as the [BLOCK_N] target and weight loads, so no per-row value goes through shared memory
(at 2 rows per thread the tile and the 1-D loads disagree: 18 barriers per block). exp is
``exp2(x log2 e - m log2 e)``: one FFMA and a flush-to-zero MUFU.EX2 (tl.exp adds a 3-instruction
denormal guard); the log is lg2.approx (tl.log is a ~25-instruction polynomial). The result: 212
warp-instructions per 128-row block, no barrier in the loop, about 7 per row with the per-program
epilogue, where the two-launch kernel it replaces took about 40.

Offsets: row and class indices are int64 before they multiply a stride (a strided view's
index * stride can pass 2**31 elements).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from . import _util

_OP = "multi_head_cross_entropy"


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log2(x, INTERPRETED: tl.constexpr):
    """log2 of positive x. On the GPU lg2.approx (one MUFU instruction, ~2**-22 relative error)
    where tl.log2 is a ~25-instruction polynomial; the interpreter has no libdevice."""
    if INTERPRETED:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _load_tile(
    x_ptr, stride_row, stride_class, rows, in_rows, C: tl.constexpr, BLOCK_C: tl.constexpr, CONTIGUOUS: tl.constexpr
):
    """Rows ``rows`` of a [N, C] head as a [BLOCK_N, BLOCK_C] float32 tile, padding columns -inf."""
    cols = tl.arange(0, BLOCK_C)
    if CONTIGUOUS:  # row stride C is a constant: aligned vector loads for C in (2, 4, 8)
        offs = rows[:, None] * C + cols[None, :]
    else:
        offs = rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_class
    if C == BLOCK_C:  # no column mask: it would split the row into scalar loads
        x = tl.load(x_ptr + offs, mask=in_rows[:, None], other=0.0).to(tl.float32)
    else:
        in_cols = cols < C
        x = tl.load(x_ptr + offs, mask=in_rows[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        x = tl.where(in_cols[None, :], x, float("-inf"))
    return x


@triton.jit
def _tile_ce(x, y, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr):
    """For a [BLOCK_N, BLOCK_C] float32 tile x (padding -inf) and targets y: e = exp(x - row max),
    its row sums, and CE = log-sum-exp - x[y], with x[y] picked from the tile in registers."""
    cols = tl.arange(0, BLOCK_C)
    row_max = tl.max(x, axis=1)
    e = tl.exp2(x * LOG2E - (row_max * LOG2E)[:, None])  # one FFMA + MUFU.EX2 (ftz) per element
    total = tl.sum(e, axis=1)
    x_target = tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
    return e, total, (row_max - x_target) + _log2(total, INTERPRETED) * LN2


@triton.jit
def _streamed_ce(
    x_ptr,
    stride_row,
    stride_class,
    rows,
    in_rows,
    y,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """(lse, CE) of rows ``rows`` of a [N, C] head with C > BLOCK_C: classes streamed in BLOCK_C
    chunks with a running max m and sum s of exp(x - m); x[y] picked from its chunk."""
    m = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    s = tl.zeros(rows.shape, dtype=tl.float32)
    x_target = tl.zeros(rows.shape, dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_cols = cols < C
        x = tl.load(
            x_ptr + rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_class,
            mask=in_rows[:, None] & in_cols[None, :],
            other=0.0,
        ).to(tl.float32)
        x = tl.where(in_cols[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2(x * LOG2E - (m_new * LOG2E)[:, None]), axis=1)
        m = m_new
        x_target += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
    lse = m + _log2(s, INTERPRETED) * LN2
    return lse, lse - x_target


@triton.jit
def _streamed_grad(
    x_ptr,
    stride_row,
    stride_class,
    g_ptr,
    rows,
    in_rows,
    y,
    lse,
    coef,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Second pass of a streamed head: G[rows] = coef (exp(x - lse) - onehot(y)), g_ptr [N, C]."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_cols = cols < C
        mask = in_rows[:, None] & in_cols[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_class, mask=mask, other=0.0
        ).to(tl.float32)
        p = tl.exp2(x * LOG2E - (lse * LOG2E)[:, None])
        d = coef[:, None] * tl.where(cols[None, :] == y[:, None], p - 1.0, p)
        tl.store(g_ptr + rows[:, None] * C + cols[None, :], d.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mhce_fwd_kernel(
    logit_ptrs,  # H pointers: head h's logits [N, C_h], any strides, fp32/fp16/bf16
    logit_row_strides,  # H ints: row stride of head h (elements)
    logit_class_strides,  # H ints: class stride of head h (elements)
    target_ptrs,  # H pointers: head h's targets [N], any integer dtype, in [0, C_h) or ignore_index
    target_strides,  # H ints
    weight_ptr,  # sample weights t [N] (read when HAS_WEIGHT)
    weight_stride,
    grad_ptrs,  # H pointers: G_h [N, C_h] contiguous, logits' dtype (written when WRITE_GRAD[h])
    row_ce_ptr,  # [H, N] float32 CE_h,i, 0 when ignored (written when WRITE_ROW_CE)
    workspace_ptr,  # int32 [>= 1 + 2 P H]: [0] ticket counter (0 between launches), then per program
    workspace_f32_ptr,  # the same memory as float32: program p's sum of t CE for head h at 1 + 2pH + h
    head_weights,  # H floats w_h
    loss_ptr,  # [] float32 out
    scale_ptr,  # [H] float32 out: s_h = w_h / max(kept_h, 1)
    N,
    ignore_index,
    H: tl.constexpr,
    NUM_CLASSES: tl.constexpr,  # H ints C_h
    BLOCK_C: tl.constexpr,  # H powers of two: the tile width of head h (MAX_TILE_C when streamed)
    CONTIGUOUS: tl.constexpr,  # H bools: head h's logits are a contiguous [N, C_h]
    WRITE_GRAD: tl.constexpr,  # H bools
    HAS_WEIGHT: tl.constexpr,
    WRITE_ROW_CE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,  # H rounded up to a power of two (final reduction)
    BLOCK_P: tl.constexpr,  # partials per step of the final reduction
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(N, BLOCK_N)
    # Per head, sum of t CE and kept count: per row for single-tile heads (reduced once, at the
    # end), per block for streamed heads, whose row vectors are spread over the lanes of a
    # class-wise layout (kept per row across blocks, they would cost BLOCK_N / 2 registers each).
    loss_acc = ()
    kept_acc = ()
    for h in tl.static_range(H):
        if NUM_CLASSES[h] <= BLOCK_C[h]:
            loss_acc = loss_acc + (tl.zeros([BLOCK_N], dtype=tl.float32),)
            kept_acc = kept_acc + (tl.zeros([BLOCK_N], dtype=tl.int32),)
        else:
            loss_acc = loss_acc + (tl.zeros([], dtype=tl.float32),)
            kept_acc = kept_acc + (tl.zeros([], dtype=tl.int32),)

    for block in range(pid, num_blocks, num_programs):
        rows = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N >= 2**31 makes block int64
        in_rows = rows < N
        # Every load of the block first (targets, weights, single-tile logits), then the math.
        targets = ()
        tiles = ()
        for h in tl.static_range(H):
            targets = targets + (tl.load(target_ptrs[h] + rows * target_strides[h], mask=in_rows, other=0),)
        if HAS_WEIGHT:
            t = tl.load(weight_ptr + rows * weight_stride, mask=in_rows, other=0.0).to(tl.float32)
        else:
            t = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
        for h in tl.static_range(H):
            if NUM_CLASSES[h] <= BLOCK_C[h]:
                x = _load_tile(
                    logit_ptrs[h],
                    logit_row_strides[h],
                    logit_class_strides[h],
                    rows,
                    in_rows,
                    NUM_CLASSES[h],
                    BLOCK_C[h],
                    CONTIGUOUS[h],
                )
                tiles = tiles + (x,)
            else:
                tiles = tiles + (in_rows,)  # streamed later: a placeholder
        new_loss = ()
        new_kept = ()
        for h in tl.static_range(H):
            y = targets[h]
            kept = in_rows & (y != ignore_index)
            y = y.to(tl.int32)  # a class index: C_h < 2**31
            coef = tl.where(kept, t, 0.0)  # t_i, 0 for ignored rows
            if NUM_CLASSES[h] <= BLOCK_C[h]:
                e, total, ce = _tile_ce(tiles[h], y, BLOCK_C[h], INTERPRETED)
                if WRITE_GRAD[h]:
                    cols = tl.arange(0, BLOCK_C[h])
                    p = e * tl.fdiv(coef, total, approx=True)[:, None]  # t_i softmax
                    d = tl.where(cols[None, :] == y[:, None], p - coef[:, None], p)
                    g_ptrs = grad_ptrs[h] + rows[:, None] * NUM_CLASSES[h] + cols[None, :]
                    if NUM_CLASSES[h] == BLOCK_C[h]:
                        tl.store(g_ptrs, d.to(grad_ptrs[h].dtype.element_ty), mask=in_rows[:, None])
                    else:
                        in_cols = cols < NUM_CLASSES[h]
                        tl.store(g_ptrs, d.to(grad_ptrs[h].dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])
            else:
                lse, ce = _streamed_ce(
                    logit_ptrs[h],
                    logit_row_strides[h],
                    logit_class_strides[h],
                    rows,
                    in_rows,
                    y,
                    NUM_CLASSES[h],
                    BLOCK_C[h],
                    INTERPRETED,
                )
                if WRITE_GRAD[h]:
                    _streamed_grad(
                        logit_ptrs[h],
                        logit_row_strides[h],
                        logit_class_strides[h],
                        grad_ptrs[h],
                        rows,
                        in_rows,
                        y,
                        lse,
                        coef,
                        NUM_CLASSES[h],
                        BLOCK_C[h],
                    )
            ce = tl.where(kept, ce, 0.0)
            if WRITE_ROW_CE:
                tl.store(row_ce_ptr + h * N.to(tl.int64) + rows, ce, mask=in_rows)
            if NUM_CLASSES[h] <= BLOCK_C[h]:
                new_loss = new_loss + (loss_acc[h] + t * ce,)
                new_kept = new_kept + (kept_acc[h] + kept.to(tl.int32),)
            else:
                new_loss = new_loss + (loss_acc[h] + tl.sum(t * ce, axis=0),)
                new_kept = new_kept + (kept_acc[h] + tl.sum(kept.to(tl.int32), axis=0),)
        loss_acc = new_loss
        kept_acc = new_kept

    # One reduction per program, then the ticket.
    base = 1 + pid * (2 * H)
    for h in tl.static_range(H):
        if NUM_CLASSES[h] <= BLOCK_C[h]:
            tl.store(workspace_f32_ptr + base + h, tl.sum(loss_acc[h], axis=0))
            tl.store(workspace_ptr + base + H + h, tl.sum(kept_acc[h], axis=0))
        else:
            tl.store(workspace_f32_ptr + base + h, loss_acc[h])
            tl.store(workspace_ptr + base + H + h, kept_acc[h])
    tl.debug_barrier()  # every thread's partial is written before the release below
    ticket = tl.atomic_add(workspace_ptr, 1, sem="acq_rel")
    if ticket == num_programs - 1:
        heads = tl.arange(0, BLOCK_H)
        in_heads = heads < H
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        kept_total = tl.zeros([BLOCK_H], dtype=tl.int64)
        for p0 in range(0, num_programs, BLOCK_P):  # program order: the same sum on every run
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < num_programs)[:, None] & in_heads[None, :]
            offs = 1 + p[:, None] * (2 * H) + heads[None, :]
            total += tl.sum(tl.load(workspace_f32_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
            kept_total += tl.sum(
                tl.load(workspace_ptr + offs + H, mask=mask, other=0, cache_modifier=".cg").to(tl.int64), axis=0
            )
        w = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h in tl.static_range(H):
            w = tl.where(heads == h, head_weights[h], w)
        scale = w / tl.maximum(kept_total.to(tl.float32), 1.0)
        tl.store(scale_ptr + heads, scale, mask=in_heads)
        tl.store(loss_ptr, tl.sum(tl.where(in_heads, scale * total, 0.0), axis=0))
        tl.store(workspace_ptr, 0)  # every program has taken its ticket: ready for the next launch


@triton.jit
def _mhce_bwd_kernel(
    grad_ptrs,  # H pointers: G_h [N, C_h] contiguous, scaled in place (when WRITE_GRAD[h])
    row_ce_ptr,  # [H, N] float32 CE_h,i (read when GRAD_WEIGHT)
    grad_weight_ptr,  # [N] out: dL/dt, sample weights' dtype (written when GRAD_WEIGHT)
    scale_ptr,  # [H] float32 s_h
    grad_loss_ptr,  # [] float32 g
    N,
    H: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program p scales elements [p BLOCK, (p + 1) BLOCK) of every G_h, seen flat (N C_h
    elements), by g s_h, and forms dL/dt_i = g sum_h s_h CE_h,i for rows in that range."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(grad_loss_ptr)
    for h in tl.static_range(H):
        if WRITE_GRAD[h]:
            mask = offs < N.to(tl.int64) * NUM_CLASSES[h]
            v = tl.load(grad_ptrs[h] + offs, mask=mask, other=0.0).to(tl.float32)
            coef = g * tl.load(scale_ptr + h)
            tl.store(grad_ptrs[h] + offs, (v * coef).to(grad_ptrs[h].dtype.element_ty), mask=mask)
    if GRAD_WEIGHT:
        in_rows = offs < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for h in tl.static_range(H):
            acc += tl.load(scale_ptr + h) * tl.load(row_ce_ptr + h * N.to(tl.int64) + offs, mask=in_rows, other=0.0)
        tl.store(grad_weight_ptr + offs, (g * acc).to(grad_weight_ptr.dtype.element_ty), mask=in_rows)


# Tile table. A head of up to MAX_TILE_C classes is one tile of width BLOCK_C = C rounded up to a
# power of two; wider heads stream MAX_TILE_C classes at a time. BLOCK_N, the rows per block, is
# chosen from the widest tile (CE_ROWS): one row per thread (128 rows, 4 warps) up to 16 classes,
# fewer rows as the tile widens, and 16 when a head streams (its class-wise layout spreads each row
# vector over the lanes: at 32 rows, 8 heads with a 97-class one took 255 registers and spilled).
# Checked for sm_90 with ptxas (no spill): benchmarks/kernel_resources.py.
CE_ROWS = {2: 128, 4: 128, 8: 128, 16: 128, 32: 64, 64: 16}  # widest BLOCK_C -> BLOCK_N
CE_BLOCK_C = tuple(CE_ROWS)
MAX_TILE_C = CE_BLOCK_C[-1]
MAX_HEADS = 32
NUM_WARPS = 4
# Persistent grid: programs per SM. 4 keeps 16 warps per SM resident (at up to 128 registers per
# thread), enough loads in flight to cover DRAM latency, and leaves ~16 blocks to each program at
# 2**20 rows, so the one reduction per program (~0.5 warp-instructions a row) and the final sum
# over P partials are noise.
PROGRAMS_PER_SM = 4
FINAL_BLOCK_P = 256
# Backward: elements per program (16 per thread: two 16-byte accesses for 16-bit gradients).
BWD_BLOCK = 2048


def tile(num_classes: Sequence[int]) -> dict:
    """The constexpr configuration for heads of ``num_classes`` classes."""
    widths = tuple(_util.fit(c, CE_BLOCK_C) for c in num_classes)
    return dict(BLOCK_N=CE_ROWS[max(widths)], BLOCK_C=widths, num_warps=NUM_WARPS)


def all_tiles() -> list[dict]:
    """One configuration per widest tile width, for heads (that width's classes, 3, 2)."""
    return [tile((c, 3, 2)) for c in CE_BLOCK_C]


def programs(device: torch.device, num_blocks: int) -> int:
    """Programs of the persistent forward grid (the interpreter counts _util.INTERPRETER_SMS SMs)."""
    return max(1, min(num_blocks, _util.num_sms(device) * PROGRAMS_PER_SM))


class Forward(NamedTuple):
    loss: torch.Tensor  # [] float32
    scale: torch.Tensor  # [H] float32 s_h
    grads: list  # per head: G_h [N, C_h] (logits' dtype), or None where not asked for
    row_ce: torch.Tensor | None  # [H, N] float32 CE (0 when ignored), when asked for


_workspaces: dict = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's int32 workspace, sized for the largest grid (ticket counter at [0], zero
    between launches), and its float32 view; one per (device, stream), since launches on one
    stream never overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    ws = _workspaces.get((device, stream))
    if ws is None:
        size = 1 + 2 * MAX_HEADS * _util.num_sms(device) * PROGRAMS_PER_SM
        buf = torch.zeros(size, dtype=torch.int32, device=device)
        ws = _workspaces[(device, stream)] = (buf, buf.view(torch.float32))
    return ws


def _check(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], sample_weight, head_weight) -> torch.device:
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
    *,
    grad_logits: Sequence[bool] = (),
    grad_weight: bool = False,
) -> Forward:
    """The loss and s_h in one launch; with ``grad_logits[h]`` also G_h, with ``grad_weight``
    (and a sample_weight) also CE [H, N], for ``backward``. N >= 1."""
    device = _check(logits, targets, sample_weight, head_weight)
    N, H = logits[0].shape[0], len(logits)
    num_classes = tuple(x.shape[1] for x in logits)
    cfg = tile(num_classes)
    write_grad = tuple(bool(g) for g in grad_logits) or (False,) * H
    write_row_ce = bool(grad_weight and sample_weight is not None)
    grads = [_util.empty((N, c), x.dtype, device) if g else None for x, c, g in zip(logits, num_classes, write_grad)]
    row_ce = _util.empty((H, N), torch.float32, device) if write_row_ce else None
    loss = _util.empty((), torch.float32, device)
    scale = _util.empty((H,), torch.float32, device)
    P = programs(device, triton.cdiv(N, cfg["BLOCK_N"]))
    ws, ws_f32 = _workspace(device)
    w = sample_weight if sample_weight is not None else loss
    with _util.on_device(device):
        _mhce_fwd_kernel[(P,)](
            tuple(logits),
            tuple(x.stride(0) for x in logits),
            tuple(x.stride(1) for x in logits),
            tuple(targets),
            tuple(y.stride(0) for y in targets),
            w,
            w.stride(0) if sample_weight is not None else 0,
            tuple(g if g is not None else x for g, x in zip(grads, logits)),
            row_ce if row_ce is not None else loss,
            ws,
            ws_f32,
            tuple(float(v) for v in head_weight),
            loss,
            scale,
            N,
            int(ignore_index),
            H=H,
            NUM_CLASSES=num_classes,
            CONTIGUOUS=tuple(x.stride(1) == 1 and x.stride(0) == c for x, c in zip(logits, num_classes)),
            WRITE_GRAD=write_grad,
            HAS_WEIGHT=sample_weight is not None,
            WRITE_ROW_CE=write_row_ce,
            BLOCK_H=triton.next_power_of_2(H),
            BLOCK_P=FINAL_BLOCK_P,
            INTERPRETED=_util.interpreter(),
            **cfg,
        )
    return Forward(loss, scale, grads, row_ce)


def backward(
    grad_loss: torch.Tensor, fwd: Forward, weight_dtype: torch.dtype | None
) -> tuple[list, torch.Tensor | None]:
    """Gradients of the logits (``fwd.grads`` scaled in place by g s_h: the same tensors, None
    where not asked for) and, when the forward wrote CE, of the sample weights (a fresh [N]
    tensor of ``weight_dtype``), in one launch."""
    write_grad = tuple(g is not None for g in fwd.grads)
    num_classes = tuple(g.shape[1] if g is not None else 1 for g in fwd.grads)
    N = fwd.row_ce.shape[1] if fwd.row_ce is not None else next(g.shape[0] for g in fwd.grads if g is not None)
    grad_weight = None if fwd.row_ce is None else _util.empty((N,), weight_dtype, fwd.loss.device)
    numel = N * max((c for c, g in zip(num_classes, write_grad) if g), default=1)
    with _util.on_device(fwd.loss.device):
        _mhce_bwd_kernel[(triton.cdiv(numel, BWD_BLOCK),)](
            tuple(g if g is not None else fwd.scale for g in fwd.grads),
            fwd.row_ce if fwd.row_ce is not None else fwd.scale,
            grad_weight if grad_weight is not None else fwd.scale,
            fwd.scale,
            grad_loss.to(torch.float32),
            N,
            H=len(fwd.grads),
            NUM_CLASSES=num_classes,
            WRITE_GRAD=write_grad,
            GRAD_WEIGHT=grad_weight is not None,
            BLOCK=BWD_BLOCK,
            num_warps=NUM_WARPS,
        )
    return fwd.grads, grad_weight
