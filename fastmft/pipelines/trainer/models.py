"""The models the trainer fits around a Hugging Face encoder: :class:`Classifier` (the baselines
and the per-domain fine-tuning) and :class:`MFTModel` (the MFT epochs), and the encoder's
training copy."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmft.data import MODEL_INPUTS
from fastmft.ops.nn import MFTLoss

from .config import TrainConfig


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Identity forward, gradient times -coeff backward (Ganin & Lempitsky)."""
    return _GradReverse.apply(x, coeff)


def _encode(encoder, batch: dict, hidden_states: bool = False):
    return encoder(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, output_hidden_states=hidden_states)


def _hidden(encoder) -> int:
    return encoder.config.hidden_size


class Classifier(nn.Module):
    """Encoder + classifier on the last layer's [CLS] state. ``num_heads`` > 1: one classifier per
    domain (BERT(MTL)). ``adv_domains``: a domain classifier behind gradient reversal (BERT(Adv))."""

    def __init__(self, encoder, num_labels: int, num_heads: int = 1, adv_domains: int = 0, adv_weight: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.num_labels, self.num_heads, self.adv_weight = num_labels, num_heads, adv_weight
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(_hidden(encoder), num_labels * num_heads)
        self.domain_classifier = nn.Linear(_hidden(encoder), adv_domains) if adv_domains else None

    def logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        cls = _encode(self.encoder, batch).last_hidden_state[:, 0]
        logits = self.classifier(self.dropout(cls))
        if self.num_heads > 1:
            logits = logits.view(-1, self.num_heads, self.num_labels)
            logits = logits[torch.arange(logits.shape[0], device=logits.device), batch["domains"]]
        return logits, cls

    def forward(self, batch: dict) -> dict:
        logits, cls = self.logits(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        out = {"loss": loss, "label_loss": loss.detach()}
        if self.domain_classifier is not None:
            dom = self.domain_classifier(grad_reverse(cls))
            domain_loss = F.cross_entropy(dom.float(), batch["domains"])
            out.update(loss=loss + self.adv_weight * domain_loss, domain_loss=domain_loss.detach())
        return out


class MFTModel(nn.Module):
    """Encoder + :class:`fastmft.MFTLoss` (its heads are the only parameters added)."""

    def __init__(self, encoder, num_labels: int, num_domains: int, layers: Sequence[int], lam: float):
        super().__init__()
        self.encoder = encoder
        self.mft = MFTLoss(_hidden(encoder), num_labels, num_domains, layers, lam)

    def forward(self, batch: dict) -> dict:
        hidden = _encode(self.encoder, batch, hidden_states=True).hidden_states
        out = self.mft(
            hidden,
            batch["attention_mask"],
            batch["labels"],
            batch["domains"],
            typicality=batch.get("typicality"),
            corrupted=batch["corrupted"],
        )
        return {"loss": out.loss, "label_loss": out.label_loss.detach(), "domain_loss": out.domain_loss.detach()}


def prepare_encoder(encoder, dropout: float | None):
    """A training copy: no pooler (MFT and the classifiers read token states; an unused pooler
    would stall DistributedDataParallel), dropout overridden when asked."""
    encoder = copy.deepcopy(encoder)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    if dropout is not None:
        for m in encoder.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(encoder.config, name):
                setattr(encoder.config, name, dropout)
    return encoder


def check_encoder(encoder, cfg: TrainConfig, tokenising: bool = True) -> None:
    """The options that depend on the encoder, before any data is tokenised or encoded
    (max_length only matters when fastmft tokenises the data itself)."""
    from fastmft.runtime.backbone import check_max_length

    if tokenising:
        check_max_length(encoder, cfg.max_length)
    depth = encoder.config.num_hidden_layers
    if cfg.layers and max(cfg.layers) > depth:
        raise ValueError(f"`layers` {','.join(map(str, cfg.layers))}: the encoder has {depth} layers")
