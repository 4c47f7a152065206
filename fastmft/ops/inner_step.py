"""The functional inner step theta' = theta - lr * grad (task selection's hot path) and the flat
parameter buffer it writes into."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _checks, dispatch
from ._checks import NonFiniteError

__all__ = ["FlatParams", "NonFiniteError", "inner_step"]


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
    check_finite: bool = False,
) -> list[Tensor]:
    """theta - lr * grad for every tensor, without autograd.

    A None grad leaves that parameter unchanged. With ``out`` (a :class:`FlatParams` or a list of
    tensors shaped like ``params``) the results are written there in place and its views are
    returned; without it new tensors are returned (a parameter with a None grad is returned
    detached, not copied).

    Implementation (chosen by :mod:`fastmft.ops.dispatch`): the compiled extension ``fastmft._C`` (one
    fused pass over all tensors, C++/OpenMP on CPU, multi-tensor CUDA kernel on GPU) when it is
    available, else torch's foreach ops; results are bitwise equal for float32/float64 (float16 and
    bfloat16: fp32 math with one rounding, which torch's own tail elements can differ from by one
    rounding of alpha * grad). ``FASTMFT_BACKEND=torch`` forces the foreach reference. ``check_finite=True`` raises :class:`NonFiniteError` when a
    result holds an inf or NaN (``out`` is written all the same); the compiled path computes the
    flag in the same pass.
    """
    params, grads = list(params), list(grads)
    if len(grads) != len(params):
        raise ValueError(f"params has {len(params)} tensors but grads has {len(grads)}")
    lr = _checks.real("lr", lr)
    outs = None
    if out is not None:
        outs = out.views if isinstance(out, FlatParams) else list(out)
        if len(outs) != len(params):
            raise ValueError(f"out has {len(outs)} tensors but params has {len(params)}")
    # One tight pass (this runs on every inner step: ~200 tensors for a BERT); messages are built
    # only on error.
    floats = _checks.FLOAT_DTYPES
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or p.dtype not in floats:
            _checks.floating(f"params[{i}]", p)
        g = grads[i]
        o = outs[i] if outs is not None else None
        if g is None and o is None:
            continue
        shape, dtype, device = p.shape, p.dtype, p.device
        if g is not None:
            if not isinstance(g, Tensor):
                _checks.tensor(f"grads[{i}]", g)
            if g.dtype != dtype or g.shape != shape or g.device != device:
                raise ValueError(
                    f"grads[{i}] is {tuple(g.shape)} {g.dtype} on {g.device} but params[{i}] is "
                    f"{tuple(shape)} {dtype} on {device}"
                )
        if o is not None and (not isinstance(o, Tensor) or o.dtype != dtype or o.shape != shape or o.device != device):
            _checks.tensor(f"out[{i}]", o)
            raise ValueError(
                f"out[{i}] is {tuple(o.shape)} {o.dtype} on {o.device} but params[{i}] is "
                f"{tuple(shape)} {dtype} on {device}"
            )
    if not params:
        return []
    return dispatch.resolve("inner_step", params[0].device)(params, grads, float(lr), outs, check_finite)
