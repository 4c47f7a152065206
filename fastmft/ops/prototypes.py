"""Class prototypes per (domain, label) cell: one-shot, streaming, merged across processes, and
the multi-prototype variant (spherical k-means)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks, dispatch
from .reference import unit_rows


class _Cells:
    """Shape accessors shared by the prototype containers (centers start with [K, M, ...])."""

    centers: Tensor

    @property
    def num_domains(self) -> int:
        return self.centers.shape[0]

    @property
    def num_labels(self) -> int:
        return self.centers.shape[1]


@dataclass(frozen=True)
class Prototypes(_Cells):
    """centers [K, M, D] float32 (empty cell: zeros) and counts [K, M] int64."""

    centers: Tensor
    counts: Tensor

    def __post_init__(self):
        _check_cells(self, "[K, M, D]", 3)


def _check_cells(cells, shape_hint: str, rank: int) -> None:
    """centers a float tensor of ``rank`` dims, counts an integer tensor shaped like centers
    without its last dim: a mismatch would index out of range in typicality."""
    _checks.floating("prototypes.centers", cells.centers)
    _checks.rank("prototypes.centers", cells.centers, rank, shape_hint=shape_hint)
    _checks.tensor("prototypes.counts", cells.counts)
    if tuple(cells.counts.shape) != tuple(cells.centers.shape[:-1]):
        raise ValueError(
            f"prototypes.counts has shape {tuple(cells.counts.shape)}, but centers of shape "
            f"{tuple(cells.centers.shape)} need {tuple(cells.centers.shape[:-1])}"
        )


@dataclass(frozen=True)
class MultiPrototypes(_Cells):
    """J prototypes per cell: centers [K, M, J, D] float32 (empty: zeros), counts
    [K, M, J] int64 (instances assigned to each prototype), and the temperature of the soft
    membership beta_j = softmax_j(cos(x, c_j) / temperature) over the cell's non-empty prototypes."""

    centers: Tensor
    counts: Tensor
    temperature: float = 0.1

    def __post_init__(self):
        _check_cells(self, "[K, M, J, D]", 4)
        # 0, a negative or a non-finite temperature makes every membership weight NaN or inverted
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")


def _check_rows(embeddings, labels, domains, num_labels: int, num_domains: int) -> None:
    _checks.floating("embeddings", embeddings)
    _checks.rank("embeddings", embeddings, 2, shape_hint="[N, D]")
    n = embeddings.shape[0]
    _checks.indices(("labels", labels, n, num_labels, None), ("domains", domains, n, num_domains, None))
    _checks.same_device(("embeddings", embeddings), ("labels", labels), ("domains", domains))


class PrototypeAccumulator:
    """Streaming per-cell sums and counts: ``update`` batch by batch, ``merge`` partial results
    (for example from shards), ``all_reduce`` across a torch.distributed group, ``result`` for
    the :class:`Prototypes`. Sums are kept in float64 so that the order of millions of updates
    barely matters; each batch is summed in float32 first."""

    def __init__(self, num_labels: int, num_domains: int, dim: int, device: torch.device | str = "cpu"):
        self.num_labels = _checks.positive_int("num_labels", num_labels)
        self.num_domains = _checks.positive_int("num_domains", num_domains)
        self.dim = _checks.positive_int("dim", dim)
        cells = num_domains * num_labels
        self.sums = torch.zeros((cells, dim), dtype=torch.float64, device=device)
        self.counts = torch.zeros(cells, dtype=torch.int64, device=device)

    def update(self, embeddings: Tensor, labels: Tensor, domains: Tensor) -> "PrototypeAccumulator":
        _check_rows(embeddings, labels, domains, self.num_labels, self.num_domains)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {embeddings.shape[1]}, the accumulator {self.dim}")
        # Sum where the embeddings are (the fused kernel on a GPU), then move the [C, D] partial
        # sums, not the [N, D] rows, to the accumulator's device.
        device = embeddings.device
        cells = domains.to(device, torch.int64) * self.num_labels + labels.to(device, torch.int64)
        sums, counts = dispatch.resolve("prototype_sums", device)(embeddings, cells, self.counts.numel())
        self.sums += sums.to(self.sums.device, torch.float64)
        self.counts += counts.to(self.counts.device)
        return self

    def merge(self, other: "PrototypeAccumulator") -> "PrototypeAccumulator":
        if (other.num_domains, other.num_labels, other.dim) != (self.num_domains, self.num_labels, self.dim):
            raise ValueError("cannot merge accumulators of different (num_domains, num_labels, dim)")
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self, group=None) -> "PrototypeAccumulator":
        """Sum the partial sums and counts of every process in ``group`` (torch.distributed). NCCL
        reduces CUDA tensors only, so under it the [C, D] sums travel through the current CUDA
        device and come back to the accumulator's device."""
        import torch.distributed as dist

        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else self.sums.device
        for total in (self.sums, self.counts):
            reduced = total.to(device)
            dist.all_reduce(reduced, group=group)
            total.copy_(reduced)
        return self

    def result(self) -> Prototypes:
        centers = self.sums / self.counts.clamp_min(1)[:, None].double()
        K, M = self.num_domains, self.num_labels
        return Prototypes(centers.float().view(K, M, self.dim), self.counts.clone().view(K, M))


def class_prototypes(
    embeddings: Tensor, labels: Tensor, domains: Tensor, num_labels: int, num_domains: int
) -> Prototypes:
    """Mean embedding of each (domain, label) cell: centers [K, M, D] float32, counts [K, M] int64."""
    _checks.positive_int("num_labels", num_labels)
    _checks.positive_int("num_domains", num_domains)
    _check_rows(embeddings, labels, domains, num_labels, num_domains)
    acc = PrototypeAccumulator(num_labels, num_domains, embeddings.shape[1], device=embeddings.device)
    return acc.update(embeddings, labels, domains).result()


def multi_prototypes(
    embeddings: Tensor,
    labels: Tensor,
    domains: Tensor,
    num_labels: int,
    num_domains: int,
    num_prototypes: int,
    *,
    iterations: int = 20,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
) -> MultiPrototypes:
    """J = ``num_prototypes`` prototypes per cell by spherical k-means.

    Seeds are J distinct rows of the cell drawn with ``generator``; a cell with fewer than J rows
    gets one prototype per row and empty (zero, count 0) slots for the rest. Each iteration
    assigns every row to the prototype of highest cosine and moves each prototype to the mean of
    its rows (so with J = 1 the prototype is the cell mean of :func:`class_prototypes`); a
    prototype that loses all its rows keeps its previous position. ``counts`` are the final
    assignment sizes. Typicality weights the cell's cosines by beta_j = softmax over its
    non-empty prototypes of cos_j / ``temperature``.
    """
    _checks.positive_int("num_labels", num_labels)
    _checks.positive_int("num_domains", num_domains)
    J = _checks.positive_int("num_prototypes", num_prototypes)
    _checks.positive_int("iterations", iterations)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_rows(embeddings, labels, domains, num_labels, num_domains)
    K, M, D = num_domains, num_labels, embeddings.shape[1]
    centers = embeddings.new_zeros((K, M, J, D), dtype=torch.float32)
    counts = torch.zeros((K, M, J), dtype=torch.int64, device=embeddings.device)
    cells = (domains.long() * M + labels.long()).cpu()
    order = torch.argsort(cells, stable=True)
    bounds = torch.bincount(cells, minlength=K * M).cumsum(0).tolist()
    start = 0
    for cell, stop in enumerate(bounds):
        rows = order[start:stop].to(embeddings.device)
        start = stop
        if rows.numel() == 0:
            continue
        x = embeddings[rows].float()
        u = unit_rows(x)
        j = min(J, x.shape[0])
        c = x[torch.randperm(x.shape[0], generator=generator)[:j].to(x.device)]
        for _ in range(iterations):
            assign = (u @ unit_rows(c).T).argmax(1)
            sizes = torch.bincount(assign, minlength=j)
            means = torch.zeros_like(c).index_add_(0, assign, x) / sizes.clamp_min(1)[:, None]
            c = torch.where((sizes > 0)[:, None], means, c)
        k, m = divmod(cell, M)
        centers[k, m, :j] = c
        counts[k, m, :j] = torch.bincount((u @ unit_rows(c).T).argmax(1), minlength=j)
    return MultiPrototypes(centers, counts, float(temperature))
