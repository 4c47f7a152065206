"""The float64 oracles: one per op, written from the formulas of docs/design.md, independent of
fastmft's code. Every test of an op (reference backend or kernel) compares against these."""

import torch


def pool64(layers, mask, skip_cls):
    """[L, B, D]: sum of each row's valid token states / max(count, 1); skip_cls drops position 0."""
    valid = mask != 0
    if skip_cls:
        valid = valid.clone()
        valid[:, 0] = False
    count = valid.sum(1).clamp_min(1).double()[:, None]
    return torch.stack([torch.where(valid[..., None], h.double(), 0.0).sum(1) / count for h in layers])


def prototypes64(x, y, k, M, K):
    """Per-(domain, class) means [K, M, D] (empty cell: zeros) and counts [K, M]."""
    cells = k.long() * M + y.long()
    sums = torch.zeros(K * M, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, cells, x.double())
    counts = torch.bincount(cells, minlength=K * M)
    return (sums / counts.clamp_min(1)[:, None]).view(K, M, -1), counts.view(K, M)


def typicality64(x, y, k, centers, counts, alpha):
    """alpha * cos(x, c[k, y]) + (1 - alpha) * mean over other domains with a non-empty (k', y)
    cell of cos(x, c[k', y]); the own cosine alone when there is none. cos(a, b) = a.b /
    (max(|a|, 1e-8) max(|b|, 1e-8))."""
    e = x.double()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)
    c = centers.double()
    c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    rows = torch.arange(x.shape[0], device=x.device)
    cos = torch.einsum("nd,kmd->nkm", e, c)[rows, :, y.long()]  # [N, K]
    own = cos[rows, k.long()]
    others = (counts > 0)[:, y.long()].T.clone()
    others[rows, k.long()] = False
    n = others.sum(1)
    other = torch.where(others, cos, 0.0).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, alpha * own + (1 - alpha) * other, own)


def mhce64(logits, targets, sample_weight=None, head_weight=None, ignore_index=-100):
    """sum_h w_h * sum over kept rows of t_i * CE_h,i / max(kept_h, 1), in float64."""
    total = torch.zeros((), dtype=torch.float64, device=logits[0].device)
    for h, (x, y) in enumerate(zip(logits, targets)):
        keep = y != ignore_index
        x = x.double()
        ce = torch.logsumexp(x, 1) - x.gather(1, torch.where(keep, y, 0).long()[:, None])[:, 0]
        if sample_weight is not None:
            ce = ce * sample_weight.double()
        w = 1.0 if head_weight is None else head_weight[h]
        total = total + w * torch.where(keep, ce, 0.0).sum() / keep.sum().clamp_min(1)
    return total
