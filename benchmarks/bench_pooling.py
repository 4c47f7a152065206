"""Masked mean pooling of L layers (the skip-layer loss's pooled states), fwd and fwd+bwd.

Providers: ``fastmft-triton`` (the fused kernel: one launch for all L layers, read from L separate
tensors as a Hugging Face encoder returns them, no stacking; CUDA, or the interpreter on CPU for
a sanity run), ``torch-eager`` (the reference of fastmft.ops.reference) and ``torch-compile`` (that
reference under torch.compile; CUDA only). The implementations are called as dispatch calls
them, after argument checking, so the rows compare the ops themselves.

Issue 3's target (full, CUDA): [L=3, B=256, T=512, D=768] bf16 at >= 85 % of the device's copy
bandwidth, 2x eager, faster than torch.compile. ``bytes`` is the minimum traffic: every token
state read once (all tokens valid here) plus the mask, the pooled output written once; the
backward writes every token's gradient once and reads the pooled gradient.

Status: measured on an H200 on 2026-11-30 (rows in benchmarks/results/results.jsonl; which rows
are valid: benchmarks/results/gpu/README.md): bf16 forward at 76 % of the copy ceiling, goal missed.
Rows taken on CPU are reference-only, or interpreter sanity rows marked ``interpreted``: not
performance data.

A/B: with FASTMFT_AB_KERNELS set (benchmarks/gpu_session.sh prepare with AB_REF=<commit>), the
earlier kernels/pooling.py runs as provider ``triton@<commit>`` beside today's, in the same group.
"""

from __future__ import annotations

from typing import Iterable

import torch

from benchmarks.harness import Case, ab_cases, forward_backward_cases, kernel_op, kernel_providers

OP = "masked_mean_pool"


def sizes(scale: str, device: torch.device) -> list[dict]:
    if scale == "quick" or device.type != "cuda":
        return [dict(L=3, B=4, T=33, D=64, dtype="float32")]
    return [
        dict(L=3, B=256, T=512, D=768, dtype="bfloat16"),  # issue 3's size
        dict(L=3, B=32, T=128, D=768, dtype="bfloat16"),  # an MFT batch
        dict(L=3, B=256, T=512, D=768, dtype="float32"),
    ]


def cases(scale: str, device: torch.device) -> Iterable[Case]:
    for size in sizes(scale, device):
        L, B, T, D = size["L"], size["B"], size["T"], size["D"]
        dtype = getattr(torch, size["dtype"])
        es = torch.empty((), dtype=dtype).element_size()
        g = torch.Generator(device=device).manual_seed(0)
        # L separate tensors, as an encoder returns them (not views of one stacked tensor).
        layers = [torch.randn(B, T, D, generator=g, device=device, dtype=dtype) for _ in range(L)]
        mask = torch.ones(B, T, dtype=torch.int64, device=device)
        grad = torch.randn(L, B, D, generator=g, device=device, dtype=dtype)
        fwd_bytes = L * B * T * D * es + mask.numel() * mask.element_size() + L * B * D * es
        bwd_bytes = L * B * T * D * es + mask.numel() * mask.element_size() + L * B * D * es
        group: list[Case] = []
        for provider in kernel_providers(scale, device):
            pool = kernel_op(provider, OP)
            group += forward_backward_cases(
                OP,
                provider,
                size,
                layers,
                lambda hs, pool=pool, mask=mask: pool(hs, mask, True),
                fwd_bytes=fwd_bytes,
                fwd_bwd_bytes=fwd_bytes + bwd_bytes,
                items=B,
                grad=grad,
            )
        yield group + ab_cases(group, "pooling")
