"""Weighted multi-head cross-entropy (the MFT loss's heads), fwd and fwd+bwd.

Four heads as in MFT with three skip layers: the label head (3 classes) and three domain heads
(4 domains), typicality sample weights, ignore_index on a few rows. Providers:
``fastmft-triton`` (all heads in one launch: 2 launches forward, 1 backward; CUDA, or the
interpreter on CPU for a sanity run), ``torch-eager`` (fastmft.ops.reference: several launches per
head) and ``torch-compile`` (the reference under torch.compile; CUDA only), called as dispatch
calls them, after argument checking.

Issue 3's targets (CUDA): MFT-sized batches B = 32..256 fwd+bwd 3x eager (launch-bound), N = 1M
rows 2x eager. On CUDA every row also counts the device operations of one call and their device
time (``device_launches``, ``kernel_ms``, from the profiler); the launch-bound sizes (N <= 4096)
also get the host time per call (``host_ms``) and a CUDA-graph replay floor (``graph_ms``). ``bytes`` = logits, targets and weights read once (forward; the backward reads
them again and writes the logits' gradients once).

Status: NO VALID GPU ROW. The H200 run of 2026-11-30 timed out before writing any (its N = 2**20
figures are log lines: benchmarks/results/gpu/README.md).
Rows taken on CPU are reference-only, or interpreter sanity rows marked ``interpreted``: not
performance data.
"""

from __future__ import annotations

from typing import Iterable

import torch

from benchmarks.harness import Case, ab_cases, forward_backward_cases, kernel_op, kernel_providers

OP = "multi_head_cross_entropy"
CLASSES = (3, 4, 4, 4)


def sizes(scale: str, device: torch.device) -> list[dict]:
    if scale == "quick" or device.type != "cuda":
        return [dict(N=64, heads=len(CLASSES), dtype="float32")]
    return [dict(N=n, heads=len(CLASSES), dtype="bfloat16") for n in (32, 256, 2**20)]


SMALL_N = 4096  # up to here CE is launch-bound: rows also get kernel time, host time and a CUDA-graph floor


def cases(scale: str, device: torch.device) -> Iterable[Case]:
    head_weight = [1.0] + [1.0 / 3] * 3
    for size in sizes(scale, device):
        N = size["N"]
        dtype = getattr(torch, size["dtype"])
        es = torch.empty((), dtype=dtype).element_size()
        g = torch.Generator(device=device).manual_seed(0)
        logits = [torch.randn(N, C, generator=g, device=device, dtype=dtype) for C in CLASSES]
        targets = [torch.randint(0, C, (N,), generator=g, device=device) for C in CLASSES]
        targets[0][::17] = -100
        weights = torch.rand(N, generator=g, device=device)
        read = sum(N * C * es for C in CLASSES) + len(CLASSES) * N * 8 + N * 4
        grads_written = sum(N * C * es for C in CLASSES)
        group: list[Case] = []
        for provider in kernel_providers(scale, device):
            mhce = kernel_op(provider, OP)
            group += forward_backward_cases(
                OP,
                provider,
                size,
                logits,
                lambda xs, mhce=mhce, targets=targets, weights=weights: mhce(xs, targets, weights, head_weight, -100),
                fwd_bytes=read,
                fwd_bwd_bytes=2 * read + grads_written,
                items=N,
                launch_profile=N <= SMALL_N,
            )
        yield group + ab_cases(group, "cross_entropy")
