"""Typicality scoring (J = 1) and the per-cell prototype sums it needs: two passes over the
embeddings, each reading every embedding once. Forward only (both are statistics).

Providers: ``fastmft-triton`` (the fused kernels; CUDA, or the interpreter on CPU for a sanity
run), ``torch-eager`` (fastmft.ops.reference) and ``torch-compile`` (CUDA only), called as dispatch
calls them, after argument checking. The reference streams N in Python-level chunks, which
torch.compile would unroll into one enormous graph at N = 4M; the compiled provider therefore
compiles the same formulas written without chunks (:func:`typicality_formula`,
:func:`prototype_sums_formula`), which is what inductor fuses best.

Issue 3's target (full, CUDA): N = 4M, D = 768 bf16, K = 5 domains at >= 80 % of the device's
copy bandwidth and 2x eager. ``bytes`` = the embeddings read once + labels and domains (int64) +
the float32 output (typicality) or the float32 sums (prototype sums).

Status: measured on an H200 on 2026-11-30 at 4M bf16 and 1M fp32, K = 5 (benchmarks/results/gpu/
README.md says which rows are valid): about 20 % of the copy ceiling, goal missed.
Rows taken on CPU are reference-only, or interpreter sanity rows marked ``interpreted``: not
performance data.
"""

from __future__ import annotations

from typing import Iterable

import torch

from benchmarks.harness import COMPILED, Case, ab_cases, kernel_op, kernel_providers


def sizes(scale: str, device: torch.device) -> list[dict]:
    if scale == "quick" or device.type != "cuda":
        return [dict(N=512, D=64, K=3, M=2, dtype="float32")]
    # issue 3's size (4M bf16, K = 5) first; K = 1 (no other domain) and K = 2 (one) are the
    # degenerate paths of the formula.
    return [
        dict(N=n, D=768, K=k, M=3, dtype=dtype)
        for n, dtype in ((4 * 2**20, "bfloat16"), (2**20, "float32"))
        for k in (5, 2, 1)
    ]


def typicality_formula(embeddings, labels, domains, centers, present, alpha, temperature):
    """fastmft.ops.reference.typicality for J = 1 without chunks (for torch.compile)."""
    from fastmft.ops.reference import unit_rows

    K = centers.shape[0]
    e = unit_rows(embeddings)
    c = unit_rows(centers[:, :, 0])  # [K, M, D]
    cos = (e[:, None, :] * c[:, labels].transpose(0, 1)).sum(-1)  # [N, K]: own class in every domain
    own = cos.gather(1, domains[:, None])[:, 0]
    others = present[:, labels, 0].T & (torch.arange(K, device=domains.device)[None] != domains[:, None])
    n_other = others.sum(1)
    other = torch.where(others, cos, 0.0).sum(1) / n_other.clamp_min(1)
    return torch.where(n_other > 0, alpha * own + (1.0 - alpha) * other, own)


def prototype_sums_formula(embeddings, cells, num_cells):
    """fastmft.ops.reference.prototype_sums without chunks (for torch.compile)."""
    sums = embeddings.new_zeros((num_cells, embeddings.shape[1]), dtype=torch.float32)
    sums.index_add_(0, cells, embeddings.float())
    return sums, torch.bincount(cells, minlength=num_cells)


def cases(scale: str, device: torch.device) -> Iterable[Case]:
    for size in sizes(scale, device):
        N, D, K, M = size["N"], size["D"], size["K"], size["M"]
        dtype = getattr(torch, size["dtype"])
        es = torch.empty((), dtype=dtype).element_size()
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, D, generator=g, device=device, dtype=dtype)
        labels = torch.randint(0, M, (N,), generator=g, device=device)
        domains = torch.randint(0, K, (N,), generator=g, device=device)
        cells = domains * M + labels
        centers = torch.randn(K, M, 1, D, generator=g, device=device)
        present = torch.ones(K, M, 1, dtype=torch.bool, device=device)
        present[0, 0] = False  # one degenerate cell
        group: list[Case] = []
        # torch.compile recompiles for every K: compared at the goal's K = 5 only, to spare GPU time.
        providers = [p for p in kernel_providers(scale, device) if p != COMPILED or K == 5]
        for provider in providers:
            typ = kernel_op(provider, "typicality", typicality_formula)
            sums = kernel_op(provider, "prototype_sums", prototype_sums_formula)

            # Defaults bind this size's tensors (not the loop variables, rebound for the next provider).
            def run_typicality(typ=typ, x=x, labels=labels, domains=domains, centers=centers, present=present):
                return typ(x, labels, domains, centers, present, 0.5, 1.0)

            group.append(
                Case(
                    "typicality",
                    provider,
                    "fwd",
                    dict(size),
                    run_typicality,
                    bytes=N * D * es + 2 * N * 8 + N * 4,
                    items=N,
                )
            )

            def run_sums(sums=sums, x=x, cells=cells, num_cells=K * M):
                return sums(x, cells, num_cells)

            group.append(
                Case(
                    "prototype_sums",
                    provider,
                    "fwd",
                    dict(size),
                    run_sums,
                    bytes=N * D * es + N * 8 + K * M * D * 4,
                    items=N,
                )
            )
        yield group + ab_cases(group, "typicality")
