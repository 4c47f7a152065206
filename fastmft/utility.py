"""Task utility for meta-learned task selection (DESIGN.md section 2), computed functionally.

For a source task s and its M sampled batches tau:
    u(s) = sum over tau of -(sum over target batches b of L_b(theta')),  theta' = theta - lr * grad L_tau(theta)

:class:`TaskUtilityScorer` does this without copying the module: the gradient at theta by
``torch.autograd.grad`` (the graph is freed at once, ``.grad`` is never touched), theta' by
:func:`fastmft.inner_step` into ONE persistent :class:`fastmft.FlatParams` buffer (the compiled
extension where available), and the target losses at theta' by ``torch.func.functional_call``
under ``torch.inference_mode``. Repeated calls reuse the same buffer: memory stays flat.

``loss_fn(model, batch) -> scalar Tensor`` is the user's loss; it receives either the module
itself (at theta) or a stand-in that calls the module with theta' (attribute access is forwarded
to the module, so ``model.config`` and the like work). The default, :func:`hf_loss`, is
``model(**batch).loss`` for Hugging Face models. The module is used as it is (train or eval mode
is the caller's choice: dropout at theta and theta' follows it).

:func:`clone_task_utility` is the slow, obvious computation (deepcopy the module, update its
parameters in place, evaluate): the reference the tests compare against and the baseline of
benchmarks/bench_utility.py.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .inner_step import FlatParams, NonFiniteError, inner_step

LossFn = Callable[[Any, Any], Tensor]


def hf_loss(model, batch) -> Tensor:
    """``model(**batch).loss``: the loss of a Hugging Face model given a batch with labels."""
    return model(**batch).loss


class _AtParams:
    """Calls ``module`` with some of its parameters replaced (torch.func.functional_call)."""

    __slots__ = ("_module", "_params")

    def __init__(self, module: nn.Module, params: dict[str, Tensor]):
        self._module = module
        self._params = params

    def __call__(self, *args, **kwargs):
        return functional_call(self._module, self._params, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class TaskUtilityScorer:
    """Scores source tasks by the target loss after one functional inner step.

    ``model``: the module (its parameters are read, never written). ``loss_fn(model, batch)``: the
    scalar loss of a batch (default :func:`hf_loss`). ``lr``: the inner step size alpha.
    ``params``: names of the parameters the inner step adapts (default: every parameter with
    ``requires_grad``); the others keep their values at theta'. ``nonfinite``: what a step whose
    theta' has an inf or NaN does: ``"raise"`` (:class:`fastmft.inner_step.NonFiniteError`),
    ``"-inf"`` (that step contributes -inf to the utility, the task is never picked), or
    ``"ignore"`` (no check; NaN spreads into the utility).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        lr: float = 1e-3,
        *,
        params: Iterable[str] | None = None,
        nonfinite: str = "raise",
    ):
        if nonfinite not in ("raise", "-inf", "ignore"):
            raise ValueError(f"nonfinite must be 'raise', '-inf' or 'ignore', got {nonfinite!r}")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else hf_loss
        self.lr = float(lr)
        self.nonfinite = nonfinite
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            names = list(params)
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(f"params names {missing[:3]} are not parameters of the model")
        if not names:
            raise ValueError("the model has no parameter to adapt (none requires grad)")
        self.names = names
        # theta' lives here for the scorer's whole life: one buffer per dtype/device, views per name.
        self.flat = FlatParams({n: named[n] for n in names}, copy=False)
        self._adapted = self.flat.as_dict()

    def _params(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    def step(self, source_batch) -> dict[str, Tensor] | None:
        """theta' = theta - lr * grad L_source(theta), written into the scorer's flat buffer.

        Returns ``{name: view}`` of theta' (valid until the next step), or None when theta' is not
        finite and ``nonfinite="-inf"``.
        """
        params = self._params()
        with torch.enable_grad():
            loss = self.loss_fn(self.model, source_batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        del loss
        try:
            inner_step(params, grads, self.lr, out=self.flat, check_finite=self.nonfinite != "ignore")
        except NonFiniteError:
            if self.nonfinite == "raise":
                raise
            return None
        return self._adapted

    def target_loss(self, target_batches: Sequence) -> Tensor:
        """Sum of the target batches' losses at the current theta' (a 0-d tensor, no graph)."""
        model = _AtParams(self.model, self._adapted)
        with torch.inference_mode():
            total = None
            for batch in target_batches:
                loss = self.loss_fn(model, batch).detach().double()
                total = loss if total is None else total + loss
        if total is None:
            return torch.zeros((), dtype=torch.float64)
        return total.clone()  # a normal tensor (not an inference tensor) for the caller

    def score(self, source_batch, target_batches: Sequence) -> float:
        """-(sum of target losses at theta') for one source batch: one term of u(s)."""
        if self.step(source_batch) is None:
            return float("-inf")
        return -float(self.target_loss(target_batches))

    def utility(self, source_batches: Iterable, target_batches: Sequence) -> float:
        """u(s) = sum over the source task's batches of :meth:`score`."""
        return sum((self.score(b, target_batches) for b in source_batches), 0.0)

    __call__ = utility

    def utilities(self, sources: dict[Any, Iterable] | Sequence[Iterable], target_batches: Sequence) -> dict | list:
        """u(s) for every source task: a dict keyed like ``sources`` or a list in its order."""
        if isinstance(sources, dict):
            return {k: self.utility(v, target_batches) for k, v in sources.items()}
        return [self.utility(v, target_batches) for v in sources]


def clone_task_utility(
    model: nn.Module,
    loss_fn: LossFn | None,
    source_batches: Iterable,
    target_batches: Sequence,
    lr: float,
    *,
    params: Iterable[str] | None = None,
) -> float:
    """The slow reference of :meth:`TaskUtilityScorer.utility`: for every source batch, deepcopy
    the module, take its gradient, update the copy's parameters in place (learn2learn-style), and
    sum the target losses of the copy under ``torch.no_grad``."""
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
