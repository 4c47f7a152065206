"""Triton implementations of fastmft's ops, registered with the dispatch layer (backend "triton").

Each op receives exactly the arguments of its reference in fastmft.ops.reference, already validated
by the public function (indices in range, shapes consistent). Autograd lives here, one
torch.autograd.Function per differentiable op; the kernels (fastmft.kernels) only launch.

Fallback rules (the reference runs instead of a kernel): float64 inputs (a precision choice the
kernels would silently give up); typicality with J > 1 prototypes per cell (documented to stay on
the reference path) or more than kernels.typicality.MAX_DOMAINS domains; cross-entropy with no
rows or more than kernels.cross_entropy.MAX_HEADS heads. Device policy: CUDA tensors, or CPU tensors through the Triton interpreter;
anything else raises RuntimeError before a kernel runs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..kernels import _util
from ..kernels import cross_entropy as _ce
from ..kernels import pooling as _pool
from ..kernels import typicality as _typ
from . import dispatch, reference


def _fallback(*tensors: Tensor) -> bool:
    """True when the reference must run: a dtype the kernels do not take (float64)."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


class _MaskedMeanPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attention_mask: Tensor, skip_cls: bool, *layers: Tensor) -> Tensor:
        out, counts = _pool.pool_forward(layers, attention_mask, skip_cls)
        ctx.save_for_backward(attention_mask, counts)
        ctx.skip_cls = skip_cls
        ctx.T = layers[0].shape[1]
        ctx.dtype = layers[0].dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        attention_mask, counts = ctx.saved_tensors
        grads = _pool.pool_backward(grad_out, attention_mask, counts, ctx.skip_cls, ctx.T, ctx.dtype)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])]
        return (None, None, *grads)


@dispatch.register("masked_mean_pool", "triton")
def masked_mean_pool(layers: Sequence[Tensor], attention_mask: Tensor, skip_cls: bool) -> Tensor:
    """[L, B, D] in the layers' dtype: one launch forward, one backward, no stacking."""
    layers = list(layers)
    if _fallback(layers[0]):
        return reference.masked_mean_pool(layers, attention_mask, skip_cls)
    _util.check_device("masked_mean_pool", *layers, attention_mask)
    return _MaskedMeanPool.apply(attention_mask, bool(skip_cls), *layers)


@dispatch.register("prototype_sums", "triton")
def prototype_sums(embeddings: Tensor, cells: Tensor, num_cells: int) -> tuple[Tensor, Tensor]:
    """Per-cell float32 sums [C, D] and int64 counts [C]; not differentiable (statistics)."""
    if _fallback(embeddings):
        return reference.prototype_sums(embeddings, cells, num_cells)
    with torch.no_grad():
        return _typ.prototype_sums(embeddings.detach(), cells, num_cells)


@dispatch.register("typicality", "triton")
def typicality(
    embeddings: Tensor,
    labels: Tensor,
    domains: Tensor,
    centers: Tensor,
    present: Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """t [N] float32 for J = 1 in one pass over the embeddings; J > 1 and float64 run the reference.
    Not differentiable (typicality is computed once, with the pre-trained encoder)."""
    if centers.shape[2] != 1 or centers.shape[0] > _typ.MAX_DOMAINS or _fallback(embeddings):
        return reference.typicality(embeddings, labels, domains, centers, present, alpha, temperature)
    _util.check_device("typicality", embeddings, labels, domains, centers, present)
    with torch.no_grad():
        unit = reference.unit_rows(centers[:, :, 0])  # [K, M, D], tiny
        return _typ.typicality(embeddings.detach(), labels, domains, unit, present.any(-1), alpha)


class _MultiHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sample_weight, head_weight, ignore_index, num_heads, *tensors):
        logits, targets = list(tensors[:num_heads]), list(tensors[num_heads:])
        loss, scale = _ce.forward(logits, targets, sample_weight, head_weight, ignore_index)
        ctx.save_for_backward(sample_weight, scale, *logits, *targets)
        ctx.ignore_index, ctx.num_heads = ignore_index, num_heads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        H = ctx.num_heads
        saved = ctx.saved_tensors
        sample_weight, scale = saved[0], saved[1]
        logits, targets = list(saved[2 : 2 + H]), list(saved[2 + H :])
        need_w = bool(ctx.needs_input_grad[0])
        grads, grad_w = _ce.backward(grad_loss, logits, targets, sample_weight, scale, ctx.ignore_index, need_w)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[4 : 4 + H])]
        return (grad_w, None, None, None, *grads, *([None] * H))


@dispatch.register("multi_head_cross_entropy", "triton")
def multi_head_cross_entropy(
    logits: Sequence[Tensor],
    targets: Sequence[Tensor],
    sample_weight: Tensor | None,
    head_weight: Sequence[float],
    ignore_index: int,
) -> Tensor:
    """float32 scalar: three launches in all (forward 2, backward 1) whatever the number of heads.
    Gradients go to fresh tensors; the user's logits are never written."""
    logits, targets = list(logits), list(targets)
    if _fallback(*logits, sample_weight) or logits[0].shape[0] == 0 or len(logits) > _ce.MAX_HEADS:
        return reference.multi_head_cross_entropy(logits, targets, sample_weight, head_weight, ignore_index)
    _util.check_device("multi_head_cross_entropy", *logits, *targets)
    return _MultiHeadCrossEntropy.apply(
        sample_weight, tuple(float(w) for w in head_weight), int(ignore_index), len(logits), *logits, *targets
    )
