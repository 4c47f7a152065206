"""Triton implementations of fastmft's ops, registered with the dispatch layer (backend "triton").

Each op receives exactly the arguments of its reference in fastmft.ops.reference, already validated
by the public function (indices in range, shapes consistent). Autograd lives here, one
torch.autograd.Function per differentiable op; the kernels (fastmft.kernels) only launch.

When the reference runs instead of a kernel is data: FALLBACKS below, registered with each
implementation and checked by fastmft.ops.dispatch before every call. Device policy: CUDA
tensors, or CPU tensors through the Triton interpreter; anything else raises RuntimeError before a
kernel runs.
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


def _float64(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


# op -> (why the reference runs, test on the op's arguments). float64 is a precision the kernels
# would silently give up; J > 1 prototypes per cell are documented to stay on the reference path.
FALLBACKS = {
    "masked_mean_pool": (("float64 input", lambda layers, mask, skip_cls: _float64(layers[0])),),
    "prototype_sums": (("float64 input", lambda emb, cells, num_cells: _float64(emb)),),
    "typicality": (
        ("float64 input", lambda emb, *_: _float64(emb)),
        ("J > 1 prototypes per cell", lambda emb, y, d, centers, *_: centers.shape[2] != 1),
        (f"more than {_typ.MAX_DOMAINS} domains", lambda emb, y, d, centers, *_: centers.shape[0] > _typ.MAX_DOMAINS),
    ),
    "multi_head_cross_entropy": (
        ("float64 input", lambda logits, targets, weight, *_: _float64(*logits, weight)),
        ("no rows", lambda logits, *_: logits[0].shape[0] == 0),
        (f"more than {_ce.MAX_HEADS} heads", lambda logits, *_: len(logits) > _ce.MAX_HEADS),
    ),
}


def _triton(op: str):
    """Register ``fn`` as the Triton implementation of ``op``, behind its FALLBACKS rules."""
    return dispatch.register(op, "triton", fallbacks=FALLBACKS[op])


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


@_triton("masked_mean_pool")
def masked_mean_pool(layers: Sequence[Tensor], attention_mask: Tensor, skip_cls: bool) -> Tensor:
    """[L, B, D] in the layers' dtype: one launch forward, one backward, no stacking."""
    layers = list(layers)
    _util.check_device("masked_mean_pool", *layers, attention_mask)
    return _MaskedMeanPool.apply(attention_mask, bool(skip_cls), *layers)


@_triton("prototype_sums")
def prototype_sums(embeddings: Tensor, cells: Tensor, num_cells: int) -> tuple[Tensor, Tensor]:
    """Per-cell float32 sums [C, D] and int64 counts [C]; not differentiable (statistics)."""
    with torch.no_grad():
        return _typ.prototype_sums(embeddings.detach(), cells, num_cells)


@_triton("typicality")
def typicality(
    embeddings: Tensor,
    labels: Tensor,
    domains: Tensor,
    centers: Tensor,
    present: Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """t [N] float32 for J = 1 in one pass over the embeddings. Not differentiable (typicality is
    computed once, with the pre-trained encoder)."""
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


@_triton("multi_head_cross_entropy")
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
    _util.check_device("multi_head_cross_entropy", *logits, *targets)
    return _MultiHeadCrossEntropy.apply(
        sample_weight, tuple(float(w) for w in head_weight), int(ignore_index), len(logits), *logits, *targets
    )
