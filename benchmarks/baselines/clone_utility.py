"""The clone-and-update task utility: what one writes without fastmft (learn2learn-style).

For every source batch: deepcopy the module, take its gradient, update the copy's parameters in
place, and sum the target losses of the copy under ``torch.no_grad``. It is the slow, obvious
computation of :meth:`fastmft.pipelines.selection.TaskUtilityScorer.utility`, and so serves twice:
the baseline ``clone-update`` of benchmarks/bench_utility.py, and the reference the scorer's tests
compare against (tests/pipelines/test_utility.py, test_selection.py). It lives here, not in
tests/oracles.py, because the benchmarks must run without the tests (and it is not a float64
oracle of one op's formula but a whole computation in the model's dtype); one copy serves both,
and it is not part of fastmft's API.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from fastmft.pipelines.selection.utility import LossFn, hf_loss


def clone_task_utility(
    model: nn.Module,
    loss_fn: LossFn | None,
    source_batches: Iterable,
    target_batches: Sequence,
    lr: float,
    *,
    params: Iterable[str] | None = None,
) -> float:
    """u(s) = sum over the source batches of -(sum of target losses at theta'), theta' = theta -
    lr * grad on a deep copy of ``model`` (``loss_fn`` None: :func:`hf_loss`; ``params``: the names
    to update, default those with ``requires_grad``)."""
    loss_fn = loss_fn if loss_fn is not None else hf_loss
    names = None if params is None else set(params)
    total = 0.0
    for batch in source_batches:
        clone = copy.deepcopy(model)
        ps = [p for n, p in clone.named_parameters() if (p.requires_grad if names is None else n in names)]
        with torch.enable_grad():
            loss = loss_fn(clone, batch)
            grads = torch.autograd.grad(loss, ps, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(ps, grads):
                if g is not None:
                    p.add_(g, alpha=-lr)
            total -= sum(float(loss_fn(clone, b)) for b in target_batches)
        del clone
    return total
