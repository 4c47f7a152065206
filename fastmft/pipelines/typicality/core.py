"""The steps after the encoder that both modes share: prototypes through
:class:`~fastmft.ops.prototypes.PrototypeAccumulator` (fed part by part on the device the parts are
on), the multi-prototype variant one (domain, label) cell at a time, and typicality with a check
that every score is finite."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from fastmft.data import stream_seed
from fastmft.ops.functional import typicality
from fastmft.ops.prototypes import MultiPrototypes, PrototypeAccumulator, Prototypes, multi_prototypes

from .config import ScoreError


def check_finite(values, ids: Sequence, what: str) -> None:
    """ScoreError naming (up to 10 of) the rows whose ``values`` hold a NaN or an infinity."""
    values = np.asarray(values)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(1) if len(values) else np.zeros(0, bool)
    if bad.any():
        shown = [str(ids[i]) for i in np.nonzero(bad)[0][:10]]
        raise ScoreError(
            f"{what} is not finite for {int(bad.sum())} row(s), ids {', '.join(shown)}"
            + (" ..." if bad.sum() > 10 else "")
            + "; nothing was written"
        )


def accumulate(
    parts: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_labels: int,
    num_domains: int,
    dim: int,
    device: torch.device | str,
) -> PrototypeAccumulator:
    """Per-cell sums and counts of (embeddings, labels, domains) parts, each summed where it lies
    (the fused kernel on a GPU) into an accumulator on ``device``."""
    acc = PrototypeAccumulator(num_labels, num_domains, dim, device=device)
    for emb, labels, domains in parts:
        acc.update(emb, labels, domains)
    return acc


def cell_prototypes(
    cell_rows: Callable[[int], torch.Tensor | None],
    num_labels: int,
    num_domains: int,
    num_prototypes: int,
    dim: int,
    *,
    temperature: float = 0.1,
    seed: int = 0,
) -> MultiPrototypes:
    """J = ``num_prototypes`` prototypes per cell by spherical k-means
    (:func:`~fastmft.ops.prototypes.multi_prototypes`), one cell at a time: ``cell_rows(cell)``
    gives the float32 embeddings of cell ``domain * num_labels + label`` (None when empty), and
    the cell's k-means is seeded with ``stream_seed(seed, cell)``, so peak memory grows with the
    largest cell and the result does not depend on how the rows were stored."""
    K, M, J = num_domains, num_labels, num_prototypes
    centers = torch.zeros(K, M, J, dim, dtype=torch.float32)
    counts = torch.zeros(K, M, J, dtype=torch.int64)
    for cell in range(K * M):
        x = cell_rows(cell)
        if x is None or not len(x):
            continue
        zero = torch.zeros(len(x), dtype=torch.long)
        g = torch.Generator().manual_seed(stream_seed(seed, cell))
        mp = multi_prototypes(x, zero, zero, 1, 1, J, temperature=temperature, generator=g)
        k, m = divmod(cell, M)
        centers[k, m], counts[k, m] = mp.centers[0, 0], mp.counts[0, 0]
    return MultiPrototypes(centers, counts, float(temperature))


def score_rows(
    emb: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    prototypes: Prototypes | MultiPrototypes,
    *,
    alpha: float,
    ids: Sequence,
) -> torch.Tensor:
    """Typicality [N] float32 on the CPU; a ScoreError names the rows (``ids``) of a non-finite
    score."""
    t = typicality(emb, labels, domains, prototypes, alpha=alpha).float().cpu()
    check_finite(t.numpy(), ids, "typicality")
    return t
