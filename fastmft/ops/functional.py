"""The public functional ops: check arguments, then run the implementation the backend picks.

NaN policy: the ops do not hide non-finite values. A NaN or Inf in a *valid* position of
``hidden_states``, in an embedding or in a logit propagates to the result; values at padded
positions of ``masked_mean_pool`` are excluded exactly and never reach it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _checks, dispatch
from .prototypes import MultiPrototypes, Prototypes


def masked_mean_pool(hidden_states, attention_mask: Tensor, *, skip_cls: bool = False) -> Tensor:
    """Mean of the valid token states of each row, for one layer or several in one call.

    hidden_states: [B, T, D], [L, B, T, D], or a list/tuple of L tensors [B, T, D] (pooled without
    being stacked first). attention_mask: [B, T] of any bool/int/float dtype, nonzero = valid.
    skip_cls: leave position 0 ([CLS]) out. Returns [B, D] or [L, B, D] in the input dtype,
    accumulated in float32; a row with no valid token gives zeros. Differentiable in
    hidden_states.
    """
    if isinstance(hidden_states, (list, tuple)):
        if not hidden_states:
            raise ValueError("hidden_states is an empty sequence; expected L tensors [B, T, D]")
        layers = list(hidden_states)
        for i, h in enumerate(layers):
            _checks.floating(f"hidden_states[{i}]", h)
            _checks.rank(f"hidden_states[{i}]", h, 3, shape_hint="[B, T, D]")
            if h.shape != layers[0].shape or h.dtype != layers[0].dtype or h.device != layers[0].device:
                raise ValueError(
                    f"hidden_states[{i}] is {tuple(h.shape)} {h.dtype} on {h.device}, but hidden_states[0] "
                    f"is {tuple(layers[0].shape)} {layers[0].dtype} on {layers[0].device}"
                )
        stacked = True
    else:
        _checks.floating("hidden_states", hidden_states)
        _checks.rank("hidden_states", hidden_states, 3, 4, shape_hint="[B, T, D] or [L, B, T, D]")
        stacked = hidden_states.dim() == 4
        layers = list(hidden_states.unbind(0)) if stacked else [hidden_states]
    if stacked and not layers:
        raise ValueError("hidden_states has L = 0 layers")
    _checks.tensor("attention_mask", attention_mask)
    _checks.rank("attention_mask", attention_mask, 2, shape_hint="[B, T]")
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
    B, T, _ = layers[0].shape
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask is {tuple(attention_mask.shape)} but hidden_states have [B, T] = [{B}, {T}]")
    _checks.same_device(("hidden_states", layers[0]), ("attention_mask", attention_mask))
    pooled = dispatch.resolve("masked_mean_pool", layers[0].device)(layers, attention_mask, bool(skip_cls))
    return pooled if stacked else pooled[0]


def typicality(
    embeddings: Tensor,
    labels: Tensor,
    domains: Tensor,
    prototypes: Prototypes | MultiPrototypes,
    *,
    alpha: float = 0.5,
) -> Tensor:
    """Typicality t_i of each instance (docs/design.md section 2), float32 [N].

    t_i = alpha * cos(E_i, c[k_i, y_i]) + (1 - alpha) * mean over the other domains k' whose cell
    (k', y_i) is non-empty of cos(E_i, c[k', y_i]); t_i = cos(E_i, c[k_i, y_i]) when there is no
    such domain. With :class:`MultiPrototypes` each cosine is the membership-weighted mean over
    the cell's prototypes.
    """
    if isinstance(prototypes, Prototypes):
        centers, present, temperature = prototypes.centers[:, :, None], (prototypes.counts > 0)[:, :, None], 1.0
    elif isinstance(prototypes, MultiPrototypes):
        centers, present, temperature = prototypes.centers, prototypes.counts > 0, prototypes.temperature
    else:
        raise TypeError(
            f"prototypes must be fastmft.Prototypes or fastmft.MultiPrototypes, got {type(prototypes).__name__}"
        )
    if not 0.0 <= _checks.real("alpha", alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    K, M, _, D = centers.shape
    _checks.floating("embeddings", embeddings)
    _checks.rank("embeddings", embeddings, 2, shape_hint="[N, D]")
    if embeddings.shape[1] != D:
        raise ValueError(f"embeddings have dim {embeddings.shape[1]} but the prototypes have dim {D}")
    n = embeddings.shape[0]
    _checks.indices(("labels", labels, n, M, None), ("domains", domains, n, K, None))
    _checks.same_device(("embeddings", embeddings), ("labels", labels), ("domains", domains), ("prototypes", centers))
    impl = dispatch.resolve("typicality", embeddings.device)
    return impl(embeddings, labels, domains, centers, present, float(alpha), float(temperature))


def multi_head_cross_entropy(
    logits: Sequence[Tensor] | Tensor,
    targets: Sequence[Tensor] | Tensor,
    *,
    sample_weight: Tensor | None = None,
    head_weight: Sequence[float] | Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Weighted cross-entropy summed over H heads of different class counts, as a float32 scalar.

    sum_h w_h * (sum over rows i with targets[h][i] != ignore_index of t_i * CE_h,i) / max(kept_h, 1)
    with t = sample_weight [N] (default 1) and w = head_weight [H] (default 1, constants).
    logits: H tensors [N, C_h] (a single tensor is one head); targets: H integer tensors [N].
    Differentiable in every logits tensor and in sample_weight.
    """
    return _multi_head_cross_entropy(logits, targets, sample_weight, head_weight, ignore_index, check_targets=True)


def _multi_head_cross_entropy(logits, targets, sample_weight, head_weight, ignore_index, *, check_targets: bool):
    """The public function's body. ``check_targets=False`` skips only the targets' range check,
    for callers that checked them already (MFTLoss checks all its indices with one host read)."""
    if isinstance(logits, Tensor) and isinstance(targets, Tensor):
        logits, targets = [logits], [targets]
    if isinstance(logits, Tensor) or isinstance(targets, Tensor):
        raise TypeError("logits and targets must both be sequences of tensors (or both single tensors)")
    logits, targets = list(logits), list(targets)
    if not logits:
        raise ValueError("logits is empty: expected H >= 1 tensors [N, C_h]")
    if len(targets) != len(logits):
        raise ValueError(f"logits has {len(logits)} heads but targets has {len(targets)}")
    n = None
    for h, x in enumerate(logits):
        _checks.floating(f"logits[{h}]", x)
        _checks.rank(f"logits[{h}]", x, 2, shape_hint="[N, C]")
        if x.shape[1] < 1:
            raise ValueError(f"logits[{h}] has no classes")
        n = x.shape[0] if n is None else n
        if x.shape[0] != n:
            raise ValueError(f"logits[{h}] has {x.shape[0]} rows but logits[0] has {n}")
    specs = [(f"targets[{h}]", y, n, x.shape[1], ignore_index) for h, (x, y) in enumerate(zip(logits, targets))]
    if check_targets:
        _checks.indices(*specs)
    else:
        for name, y, rows, _, _ in specs:
            _checks.index_tensor(name, y, rows)
    for h, (x, y) in enumerate(zip(logits, targets)):
        _checks.same_device(("logits[0]", logits[0]), (f"logits[{h}]", x), (f"targets[{h}]", y))
    if sample_weight is not None:
        _checks.floating("sample_weight", sample_weight)
        _checks.rank("sample_weight", sample_weight, 1, shape_hint="[N]")
        if sample_weight.shape[0] != n:
            raise ValueError(f"sample_weight has {sample_weight.shape[0]} entries, expected N = {n}")
        _checks.same_device(("logits[0]", logits[0]), ("sample_weight", sample_weight))
    if head_weight is None:
        weights = [1.0] * len(logits)
    else:
        weights = (
            head_weight.detach().flatten().tolist()
            if isinstance(head_weight, Tensor)
            else [float(w) for w in head_weight]
        )
        if len(weights) != len(logits):
            raise ValueError(f"head_weight has {len(weights)} entries but there are {len(logits)} heads")
    impl = dispatch.resolve("multi_head_cross_entropy", logits[0].device)
    return impl(logits, targets, sample_weight, weights, int(ignore_index))


def shuffle_domains(domains: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Corrupted domain labels for the skip-layer loss: ``domains`` under a random permutation."""
    _checks.tensor("domains", domains)
    if domains.dtype.is_floating_point or domains.dtype.is_complex or domains.dtype == torch.bool:
        raise TypeError(f"domains must be an integer tensor, got {domains.dtype}")
    _checks.rank("domains", domains, 1, shape_hint="[N]")
    device = generator.device if generator is not None else domains.device
    perm = torch.randperm(domains.shape[0], generator=generator, device=device)
    return domains[perm.to(domains.device)]
