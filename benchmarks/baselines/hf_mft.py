"""The baseline MFT step: a plain Hugging Face implementation of the same loss.

What an engineer would write without fastmft: every batch padded to the maximum length (the
tokenizer's ``padding="max_length"``), the pooling and the cross-entropies as eager PyTorch ops,
one op per layer and per head. It computes the same L = L_TLC + lam * L_SDC as
:class:`fastmft.MFTLoss` (docs/design.md section 2) and has the same parameters under the same names
(``label_head``, ``domain_heads``, ``domain_embedding``), so ``load_state_dict`` moves weights
between the two and the benchmark compares like with like (tests/benchmarks/test_benchmarks.py checks the
two losses agree).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HFMFTLoss(nn.Module):
    def __init__(
        self, hidden_size: int, num_labels: int, num_domains: int, layers: Sequence[int] = (4, 8, 12), lam: float = 0.1
    ):
        super().__init__()
        self.layers = tuple(int(l) for l in layers)
        self.lam = float(lam)
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (loss, label_loss, domain_loss)."""
        n = labels.shape[0]
        t = typicality if typicality is not None else torch.ones(n, device=labels.device)
        if corrupted is None:
            corrupted = domains[torch.randperm(n, device=domains.device)]
        # L_TLC on the last layer's [CLS] state.
        logits = self.label_head(hidden_states[-1][:, 0])
        label_loss = (t * F.cross_entropy(logits.float(), labels, reduction="none")).mean()
        # L_SDC: masked mean pooling of each skip layer without [CLS], plus the true domain's embedding.
        mask = attention_mask.to(hidden_states[-1].dtype).clone()
        mask[:, 0] = 0
        denom = mask.sum(1, keepdim=True).clamp(min=1)
        domain_vec = self.domain_embedding(domains)
        domain_loss = 0.0
        for layer, head in zip(self.layers, self.domain_heads):
            h = hidden_states[layer]
            pooled = (h * mask[:, :, None]).sum(1) / denom
            dlogits = head(pooled + domain_vec)
            domain_loss = domain_loss + (t * F.cross_entropy(dlogits.float(), corrupted, reduction="none")).mean()
        domain_loss = domain_loss / len(self.layers)
        return label_loss + self.lam * domain_loss, label_loss, domain_loss


def pad_batch(input_ids: Tensor, lengths: Tensor, pad_to: int, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of shape [B, pad_to]: the first ``lengths[i]`` tokens of row i
    kept, the rest ``pad_id`` with mask 0. ``pad_to`` = the max length for the baseline, the
    batch's longest sequence for a length-aware collate."""
    ids = input_ids[:, :pad_to].clone()
    mask = (torch.arange(pad_to, device=lengths.device)[None, :] < lengths[:, None]).to(torch.long)
    ids[mask == 0] = pad_id
    return ids, mask
