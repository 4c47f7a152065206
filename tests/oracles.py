"""The oracles: one per op, written from the formulas of docs/design.md, independent of fastmft's
code, in float64. Every test of an op (reference backend or kernel) compares against these."""

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


def typicality64(x, y, k, centers, counts, alpha, temperature=0.1):
    """alpha * cellcos(x, k, y) + (1 - alpha) * mean over other domains with a non-empty (k', y)
    cell of cellcos(x, k', y); the own term alone when there is none.

    One prototype per cell (centers [K, M, D], counts [K, M]): cellcos = cos(x, c[k, y]), with
    cos(a, b) = a.b / (max(|a|, 1e-8) max(|b|, 1e-8)). J prototypes per cell (centers
    [K, M, J, D], counts [K, M, J]): cellcos = sum_j beta_j cos(x, c[k, y, j]), beta =
    softmax over the cell's non-empty prototypes of cos / temperature, and 0 for an all-empty cell.
    """
    e = x.double()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)
    c = centers.double()
    c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    rows, y, k = torch.arange(x.shape[0], device=x.device), y.long(), k.long()
    if c.dim() == 3:
        cell_cos = torch.einsum("nd,kmd->nkm", e, c)[rows, :, y]  # [N, K]
        cell_present = counts > 0
    else:
        cos = torch.einsum("nd,kmjd->nkmj", e, c)[rows, :, y]  # [N, K, J]
        # cos <= 1, so exp(cos / temperature) is finite in float64 for any temperature > 0.0015
        beta = torch.where((counts > 0)[:, y].permute(1, 0, 2), torch.exp(cos / temperature), 0.0)
        mass = beta.sum(-1)
        cell_cos = torch.where(mass > 0, (beta * cos).sum(-1) / mass.clamp_min(1e-300), 0.0)
        cell_present = counts.sum(-1) > 0
    own = cell_cos[rows, k]
    others = cell_present[:, y].T.clone()
    others[rows, k] = False
    n = others.sum(1)
    other = torch.where(others, cell_cos, 0.0).sum(1) / n.clamp_min(1)
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


def mft_loss64(module, hidden_states, mask, labels, domains, t, corrupted):
    """(L, L_TLC, L_SDC) of docs/design.md section 2 with the weights of the MFTLoss ``module``:
    the [CLS] state of the last layer through the label head, the masked mean (without [CLS]) of
    each skip layer plus the true domain's embedding through its domain head, every row weighted
    by max(t, 0) (t None: 1), the layers' heads weighted 1 / |L_s|."""
    d = lambda a: a.detach().double()  # noqa: E731
    w = None if t is None else d(t).clamp_min(0)
    label_logits = d(hidden_states[-1][:, 0]) @ d(module.label_head.weight).T + d(module.label_head.bias)
    tlc = mhce64([label_logits], [labels], w)
    pooled = pool64([d(hidden_states[l]) for l in module.layers], mask, skip_cls=True)
    features = [p + d(module.domain_embedding.weight)[domains] for p in pooled]
    domain_logits = [f @ d(head.weight).T + d(head.bias) for f, head in zip(features, module.domain_heads)]
    L = len(module.layers)
    sdc = mhce64(domain_logits, [corrupted] * L, w, [1.0 / L] * L)
    return tlc + module.lam * sdc, tlc, sdc


def inner_step64(params, grads, lr):
    """theta - lr * grad per tensor in float64; a None grad leaves the parameter as it is."""
    return [p.detach().double() - (0.0 if g is None else lr * g.detach().double()) for p, g in zip(params, grads)]
