"""The functional inner step theta' = theta - lr * grad (task selection's hot path) and the flat
parameter buffer it writes into."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _checks, backend


class FlatParams:
    """One flat buffer per (dtype, device) holding a list of tensors, exposed as per-tensor views.

    Built once, reused without copies: ``copy_`` refills the buffers in place, and the views stay
    valid for as long as the object lives. ``as_dict`` gives ``{name: view}`` for
    ``torch.func.functional_call`` when built from named tensors.
    """

    def __init__(self, tensors: Iterable[Tensor] | Mapping[str, Tensor], *, copy: bool = True):
        if isinstance(tensors, Mapping):
            self.names: list[str] | None = list(tensors.keys())
            sources = list(tensors.values())
        else:
            self.names = None
            sources = list(tensors)
        for i, t in enumerate(sources):
            _checks.tensor(f"tensors[{i}]", t)
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        offsets = []
        for t in sources:
            key = (t.dtype, t.device)
            offsets.append(sizes.get(key, 0))
            sizes[key] = offsets[-1] + t.numel()
        self.buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {
            key: torch.empty(size, dtype=key[0], device=key[1]) for key, size in sizes.items()
        }
        self.views: list[Tensor] = [
            self.buffers[(t.dtype, t.device)][o : o + t.numel()].view(t.shape) for t, o in zip(sources, offsets)
        ]
        if copy:
            self.copy_(sources)

    @classmethod
    def from_module(cls, module: nn.Module, *, copy: bool = True) -> "FlatParams":
        """Flat copy of ``module``'s named parameters (names as ``named_parameters`` gives them)."""
        return cls(dict(module.named_parameters()), copy=copy)

    def copy_(self, tensors: Sequence[Tensor]) -> "FlatParams":
        tensors = list(tensors)
        if len(tensors) != len(self.views):
            raise ValueError(f"expected {len(self.views)} tensors, got {len(tensors)}")
        with torch.no_grad():
            torch._foreach_copy_(self.views, [t.detach() for t in tensors])
        return self

    def as_dict(self) -> dict[str, Tensor]:
        if self.names is None:
            raise ValueError("FlatParams built from an unnamed list has no names; build it from a dict or a module")
        return dict(zip(self.names, self.views))

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> Tensor:
        return self.views[i]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.views)


def inner_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    lr: float,
    *,
    out: FlatParams | Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """theta - lr * grad for every tensor, without autograd.

    A None grad leaves that parameter unchanged. With ``out`` (a :class:`FlatParams` or a list of
    tensors shaped like ``params``) the results are written there in place and its views are
    returned; without it new tensors are returned (a parameter with a None grad is returned
    detached, not copied).
    """
    params, grads = list(params), list(grads)
    if len(grads) != len(params):
        raise ValueError(f"params has {len(params)} tensors but grads has {len(grads)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        _checks.floating(f"params[{i}]", p)
        if g is None:
            continue
        _checks.tensor(f"grads[{i}]", g)
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"grads[{i}] is {tuple(g.shape)} {g.dtype} on {g.device} but params[{i}] is "
                f"{tuple(p.shape)} {p.dtype} on {p.device}"
            )
    if isinstance(lr, Tensor):
        lr = float(lr)
    outs = None
    if out is not None:
        outs = out.views if isinstance(out, FlatParams) else list(out)
        if len(outs) != len(params):
            raise ValueError(f"out has {len(outs)} tensors but params has {len(params)}")
        for i, (o, p) in enumerate(zip(outs, params)):
            if o.shape != p.shape or o.dtype != p.dtype or o.device != p.device:
                raise ValueError(
                    f"out[{i}] is {tuple(o.shape)} {o.dtype} on {o.device} but params[{i}] is "
                    f"{tuple(p.shape)} {p.dtype} on {p.device}"
                )
    if not params:
        return []
    return backend.resolve("inner_step", params[0].device)(params, grads, float(lr), outs)
