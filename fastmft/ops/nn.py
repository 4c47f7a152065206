"""Drop-in modules: the MFT loss (typicality-weighted label loss plus skip-layer domain corruption)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from . import _checks
from .functional import (
    _multi_head_cross_entropy,
    masked_mean_pool,
    multi_head_cross_entropy,
    shuffle_domains,
)


def skip_layers(num_hidden_layers: int, count: int = 3) -> tuple[int, ...]:
    """The paper's default skip layers: ``count`` evenly spaced layers ending at the last one
    (1-based), e.g. (4, 8, 12) for 12 layers and (2, 4, 6) for 6."""
    _checks.positive_int("num_hidden_layers", num_hidden_layers)
    _checks.positive_int("count", count)
    return tuple(sorted({max(1, round(num_hidden_layers * (i + 1) / count)) for i in range(count)}))


@dataclass
class MFTLossOutput:
    loss: Tensor  # label_loss + lam * domain_loss
    label_loss: Tensor  # L_TLC
    domain_loss: Tensor  # L_SDC
    logits: Tensor  # label logits [N, num_labels]
    domain_logits: list[Tensor]  # one [N, num_domains] per skip layer, in the order of `layers`


class MFTLoss(nn.Module):
    """L = L_TLC + lam * L_SDC over a Hugging Face encoder's hidden states (docs/design.md section 2).

    Added parameters, plain modules on purpose: ``label_head`` (Linear hidden -> num_labels, on the
    last layer's [CLS] state), ``domain_heads`` (one Linear hidden -> num_domains per skip layer,
    in the order of ``layers``) and ``domain_embedding`` (Embedding num_domains x hidden, added to
    each skip layer's pooled state). ``layers`` are 1-based: layer l is ``hidden_states[l]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        num_domains: int,
        layers: Sequence[int] = (4, 8, 12),
        lam: float = 0.1,
    ):
        super().__init__()
        _checks.positive_int("hidden_size", hidden_size)
        _checks.positive_int("num_labels", num_labels)
        _checks.positive_int("num_domains", num_domains)
        layers = tuple(layers)
        if not layers or any(isinstance(l, bool) or not isinstance(l, numbers.Integral) or l < 1 for l in layers):
            raise ValueError(f"layers must be a non-empty sequence of 1-based layer indices (ints), got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a layer, got {layers}")
        self.layers = tuple(int(l) for l in layers)
        self.lam = _checks.real("lam", lam, minimum=0.0)
        self.num_labels, self.num_domains = num_labels, num_domains
        self.label_head = nn.Linear(hidden_size, num_labels)
        self.domain_heads = nn.ModuleList(nn.Linear(hidden_size, num_domains) for _ in self.layers)
        self.domain_embedding = nn.Embedding(num_domains, hidden_size)

    def forward(
        self,
        hidden_states: Sequence[Tensor],
        attention_mask: Tensor,
        labels: Tensor,
        domains: Tensor,
        typicality: Tensor | None = None,
        corrupted: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MFTLossOutput:
        """hidden_states: the tuple a Hugging Face encoder returns with output_hidden_states=True
        (embeddings first, then one tensor per layer). typicality: per-instance weights t (default
        1), clamped at 0 before they weight TLC and SDC: t is a mix of cosines and can be negative
        (7 Amazon training rows with MiniLM), and a negative weight would turn that row's loss
        into gradient ascent, so such a row contributes nothing (and gets no gradient through t).
        corrupted: the SDC targets (default: ``shuffle_domains(domains, generator)``)."""
        if isinstance(hidden_states, Tensor) or not isinstance(hidden_states, Sequence):
            raise TypeError("hidden_states must be the tuple of per-layer tensors (output_hidden_states=True)")
        if max(self.layers) >= len(hidden_states):
            raise ValueError(
                f"layers {self.layers} need hidden_states[{max(self.layers)}], but only {len(hidden_states)} "
                f"tensors were given (embeddings + {len(hidden_states) - 1} layers)"
            )
        last = hidden_states[-1]
        _checks.floating("hidden_states[-1]", last)
        _checks.rank("hidden_states[-1]", last, 3, shape_hint="[B, T, D]")
        if last.shape[-1] != self.label_head.in_features:
            raise ValueError(
                f"hidden_states[-1] has hidden size {last.shape[-1]}, but this MFTLoss was built with "
                f"hidden_size={self.label_head.in_features}"
            )
        # Named by the user's layer numbers: the pooling below would only know list positions.
        for l in sorted(set(self.layers)):
            name = f"hidden_states[{l}] (skip layer {l})"
            _checks.floating(name, hidden_states[l])
            if tuple(hidden_states[l].shape) != tuple(last.shape):
                raise ValueError(
                    f"{name} has shape {tuple(hidden_states[l].shape)}; every layer must be "
                    f"[B, T, D] = {tuple(last.shape)} like hidden_states[-1]"
                )
        if last.shape[1] < 1:
            raise ValueError("hidden_states have no token (T = 0): the label head reads the first ([CLS]) token")
        n = last.shape[0]
        # One host read checks every index of the step; the heads below skip their own checks.
        specs = [("labels", labels, n, self.num_labels, -100), ("domains", domains, n, self.num_domains, None)]
        if corrupted is not None:
            specs.append(("corrupted", corrupted, n, self.num_domains, None))
        _checks.indices(*specs)
        if corrupted is None:
            corrupted = shuffle_domains(domains, generator)  # a permutation of checked domains
        weights = None if typicality is None else typicality.clamp_min(0)
        logits = self.label_head(last[:, 0])
        label_loss = _multi_head_cross_entropy([logits], [labels], weights, None, -100, check_targets=False)
        pooled = masked_mean_pool([hidden_states[l] for l in self.layers], attention_mask, skip_cls=True)
        domain_vec = self.domain_embedding(domains)
        domain_logits = [head(p + domain_vec) for head, p in zip(self.domain_heads, pooled)]
        domain_loss = _multi_head_cross_entropy(
            domain_logits,
            [corrupted] * len(domain_logits),
            weights,
            [1.0 / len(domain_logits)] * len(domain_logits),
            -100,
            check_targets=False,
        )
        return MFTLossOutput(label_loss + self.lam * domain_loss, label_loss, domain_loss, logits, domain_logits)


class MultiHeadCrossEntropyLoss(nn.Module):
    """Drop-in module for :func:`fastmft.multi_head_cross_entropy`: weighted cross-entropy summed
    over H heads of different class counts, fused into one launch per direction on the Triton
    backend. ``head_weight`` (H floats, default 1) and ``ignore_index`` are fixed at construction;
    ``forward(logits, targets, sample_weight=None)`` takes H tensors [N, C_h] and H targets [N]
    (or one tensor each) and returns a float32 scalar."""

    def __init__(self, head_weight: Sequence[float] | None = None, ignore_index: int = -100):
        super().__init__()
        self.head_weight = None if head_weight is None else [float(w) for w in head_weight]
        self.ignore_index = int(ignore_index)

    def forward(self, logits, targets, sample_weight: Tensor | None = None) -> Tensor:
        return multi_head_cross_entropy(
            logits, targets, sample_weight=sample_weight, head_weight=self.head_weight, ignore_index=self.ignore_index
        )


class MaskedMeanPool(nn.Module):
    """Drop-in module for :func:`fastmft.masked_mean_pool`: ``forward(hidden_states,
    attention_mask)`` pools one layer [B, T, D], a stack [L, B, T, D] or a list of L layers in one
    launch on the Triton backend; ``skip_cls`` leaves the [CLS] position out."""

    def __init__(self, skip_cls: bool = False):
        super().__init__()
        self.skip_cls = bool(skip_cls)

    def forward(self, hidden_states, attention_mask: Tensor) -> Tensor:
        return masked_mean_pool(hidden_states, attention_mask, skip_cls=self.skip_cls)
