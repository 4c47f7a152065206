"""Pure-PyTorch reference of every op: the ground truth for the fused kernels and the CPU path.

Inputs arrive validated and normalised by the public functions (fastmft.ops.functional and friends);
nothing here checks arguments again. All sums accumulate in float32 (or wider). Large inputs are
processed in chunks so that no temporary grows beyond ``_CHUNK_ELEMENTS`` float32 values.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _checks, dispatch

# Upper bound on the elements of one float32 temporary (64 MiB); bounds peak memory for large N.
_CHUNK_ELEMENTS = 1 << 24
COS_EPS = 1e-8


def _row_chunks(rows: int, row_elements: int) -> tuple[range, int]:
    """Chunk starts and step so that step * row_elements stays within _CHUNK_ELEMENTS."""
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    return range(0, rows, step), step


@dispatch.register("masked_mean_pool", "torch")
def masked_mean_pool(layers: Sequence[Tensor], attention_mask: Tensor, skip_cls: bool) -> Tensor:
    """layers: L tensors [B, T, D]; attention_mask [B, T], nonzero = valid. Returns [L, B, D].

    The result has the layers' dtype. Padded positions are excluded exactly (torch.where, not a
    multiply), so non-finite values there do not leak into the mean; a row without valid tokens
    pools to zeros. skip_cls also excludes position 0.
    """
    B, T, D = layers[0].shape
    valid = attention_mask != 0
    if skip_cls and T:
        valid[:, 0] = False
    counts = valid.sum(1, dtype=torch.float32).clamp_min(1.0)[:, None]
    starts, step = _row_chunks(B, T * D)
    pooled = []
    for h in layers:
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 input
        sums = [torch.where(valid[s : s + step, :, None], h[s : s + step].to(acc), 0.0).sum(1) for s in starts]
        total = torch.cat(sums) if sums else h.new_zeros((0, D), dtype=acc)
        pooled.append((total / counts).to(h.dtype))
    return torch.stack(pooled)


@dispatch.register("prototype_sums", "torch")
def prototype_sums(embeddings: Tensor, cells: Tensor, num_cells: int) -> tuple[Tensor, Tensor]:
    """Per-cell float32 sums [C, D] and int64 counts [C] of the rows of ``embeddings``."""
    N, D = embeddings.shape
    sums = embeddings.new_zeros((num_cells, D), dtype=torch.float32)
    starts, step = _row_chunks(N, D)
    for s in starts:
        sums.index_add_(0, cells[s : s + step], embeddings[s : s + step].float())
    return sums, torch.bincount(cells, minlength=num_cells)


def unit_rows(x: Tensor) -> Tensor:
    """x / max(|x|, 1e-8) along the last dim, in float32: the cosine contract of docs/design.md.

    The norm is taken of x / max|x| and scaled back, so rows whose squares overflow float32
    (|x| >= ~1.8e19) still get their unit vector instead of x / inf = 0."""
    x = x.float()
    if x.shape[-1] == 0:
        return x
    scale = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    scaled = x / scale
    return scaled / torch.maximum(torch.linalg.vector_norm(scaled, dim=-1, keepdim=True), COS_EPS / scale)


@dispatch.register("typicality", "torch")
def typicality(
    embeddings: Tensor,
    labels: Tensor,
    domains: Tensor,
    centers: Tensor,
    present: Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """Typicality of each row against J prototypes per (domain, class) cell.

    centers [K, M, J, D]; present [K, M, J] bool marks non-empty prototypes. With J = 1 the cell
    cosine is the plain cosine; with J > 1 it is the membership-weighted mean
    sum_j beta_j cos_j / sum_j beta_j, beta = softmax over the cell's present prototypes of
    cos_j / temperature.
    """
    N, D = embeddings.shape
    K, M, J, _ = centers.shape
    flat = unit_rows(centers).reshape(K * M * J, D)
    cell_present = present.any(-1)  # [K, M]
    out = torch.empty(N, dtype=torch.float32, device=embeddings.device)
    starts, step = _row_chunks(N, max(D, K * M * J))
    for s in starts:
        e = unit_rows(embeddings[s : s + step])
        y, k = labels[s : s + step], domains[s : s + step]
        n = e.shape[0]
        rows = torch.arange(n, device=e.device)
        # Cosines with every prototype are cheap (K*M*J is small); keep the row's class only.
        cos = (e @ flat.T).view(n, K, M, J)[rows, :, y, :]  # [n, K, J]
        if J == 1:
            cell_cos = cos[..., 0]
        else:
            mask = present[:, y, :].permute(1, 0, 2)  # [n, K, J]
            beta = torch.softmax((cos / temperature).masked_fill(~mask, float("-inf")), dim=-1)
            cell_cos = torch.nan_to_num((beta * cos).sum(-1), nan=0.0)  # all-empty cell: 0
        own = cell_cos[rows, k]
        others = cell_present[:, y].T.clone()  # [n, K]: other domains with a non-empty (k', y) cell
        others[rows, k] = False
        n_other = others.sum(1)
        other = torch.where(others, cell_cos, 0.0).sum(1) / n_other.clamp_min(1)
        out[s : s + n] = torch.where(n_other > 0, alpha * own + (1.0 - alpha) * other, own)
    return out


@dispatch.register("multi_head_cross_entropy", "torch")
def multi_head_cross_entropy(
    logits: Sequence[Tensor],
    targets: Sequence[Tensor],
    sample_weight: Tensor | None,
    head_weight: Sequence[float],
    ignore_index: int,
) -> Tensor:
    """sum_h w_h * sum_{i kept} t_i CE_h,i / max(#kept_h, 1), cross-entropy in float32."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    for x, y, w in zip(logits, targets, head_weight):
        keep = y != ignore_index
        x32 = x.float()
        ce = torch.logsumexp(x32, dim=1) - x32.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
        if sample_weight is not None:
            ce = ce * sample_weight.float()
        total = total + w * torch.where(keep, ce, 0.0).sum() / keep.sum().clamp_min(1)
    return total


@dispatch.register("inner_step", "torch")
def inner_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    lr: float,
    out: Sequence[Tensor] | None,
    check_finite: bool = False,
) -> list[Tensor]:
    """theta - lr * grad with torch's foreach ops; a None grad leaves the parameter as it is.
    ``check_finite``: raise NonFiniteError when a result holds an inf or NaN (``out`` is written)."""
    with torch.no_grad():
        stepped = [i for i, g in enumerate(grads) if g is not None]
        ps = [params[i].detach() for i in stepped]
        gs = [grads[i].detach() for i in stepped]
        if out is None:
            result = [p.detach() for p in params]
            for i, t in zip(stepped, torch._foreach_add(ps, gs, alpha=-lr) if ps else []):
                result[i] = t
        else:
            torch._foreach_copy_(list(out), [p.detach() for p in params])
            if ps:
                torch._foreach_add_([out[i] for i in stepped], gs, alpha=-lr)
            result = list(out)
    if check_finite:
        _checks.finite("fastmft.inner_step: theta - lr * grad", result)
    return result
