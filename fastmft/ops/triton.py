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
    """Per-cell float32 sums [C, D] and int64 counts [C], the same bits on every run (no float
    atomics); not differentiable (statistics)."""
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
    """The forward also writes the gradients that will be needed (kernels/cross_entropy.py), so
    the backward only scales them by g s_h, in place, and hands them out."""

    @staticmethod
    def forward(ctx, sample_weight, head_weight, ignore_index, grad_logits, grad_weight, *tensors):
        H = len(head_weight)
        logits, targets = tensors[:H], tensors[H:]
        fwd = _ce.forward(
            logits, targets, sample_weight, head_weight, ignore_index, grad_logits=grad_logits, grad_weight=grad_weight
        )
        ctx.fused = fwd
        ctx.head_weight, ctx.ignore_index = head_weight, ignore_index
        ctx.weight_dtype = None if sample_weight is None else sample_weight.dtype
        ctx.save_for_backward(sample_weight, *tensors)  # read only by a second backward
        return fwd.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        H = len(ctx.head_weight)
        fwd, ctx.fused = ctx.fused, None  # let autograd take the buffers without a copy
        if fwd is not None:
            grads, grad_w = _ce.backward(grad_loss, fwd, ctx.weight_dtype)
        else:  # a second backward through a retained graph: the fused gradients were handed out
            grads, grad_w = _reference_grads(ctx, grad_loss)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[5 : 5 + H])]
        return (grad_w if ctx.needs_input_grad[0] else None, None, None, None, None, *grads, *([None] * H))


def _reference_grads(ctx, grad_loss: Tensor) -> tuple[list, Tensor | None]:
    """The gradients by autograd through the reference, from the saved inputs."""
    H = len(ctx.head_weight)
    saved = ctx.saved_tensors
    sample_weight, logits, targets = saved[0], saved[1 : 1 + H], saved[1 + H :]
    with torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in logits]
        w = None if sample_weight is None else sample_weight.detach().requires_grad_()
        loss = reference.multi_head_cross_entropy(xs, targets, w, ctx.head_weight, ctx.ignore_index)
        got = torch.autograd.grad(loss, xs + ([w] if w is not None else []), grad_loss)
    return list(got[:H]), (got[H] if w is not None else None)


@_triton("multi_head_cross_entropy")
def multi_head_cross_entropy(
    logits: Sequence[Tensor],
    targets: Sequence[Tensor],
    sample_weight: Tensor | None,
    head_weight: Sequence[float],
    ignore_index: int,
) -> Tensor:
    """float32 scalar: one launch forward, one backward, whatever the number of heads. The
    forward writes the gradients that will be needed into fresh tensors; the user's logits are
    never written."""
    grad_mode = torch.is_grad_enabled()
    return _MultiHeadCrossEntropy.apply(
        sample_weight,
        tuple(float(w) for w in head_weight),
        int(ignore_index),
        tuple(grad_mode and x.requires_grad for x in logits),
        grad_mode and sample_weight is not None and sample_weight.requires_grad,
        *logits,
        *targets,
    )
