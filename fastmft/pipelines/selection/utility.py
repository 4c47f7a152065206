"""Task utility for meta-learned task selection (docs/design.md section 2), computed functionally.

For a source task s and its M sampled batches tau:
    u(s) = sum over tau of -(sum over target batches b of L_b(theta')),  theta' = theta - lr * grad L_tau(theta)

:class:`TaskUtilityScorer` does this without copying the module: the gradient at theta by
``torch.autograd.grad`` (the graph is freed at once, ``.grad`` is never touched), theta' by
:func:`fastmft.inner_step` into ONE persistent :class:`fastmft.FlatParams` buffer (the compiled
extension where available), and the target losses at theta' by ``torch.func.functional_call``
under ``torch.inference_mode``. Repeated calls reuse the same buffer: memory stays flat.

Embedding tables (``nn.Embedding``: half of MiniLM's parameters are its word embeddings) take
row-sparse gradients during the step (the module's ``sparse`` flag is set for the backward and
restored): a batch touches a few hundred of 30,522 rows, so the dense gradient (allocated and
zeroed on every backward) and the full-table step are skipped. theta' of such a table differs from
theta only in the rows the last step touched; the next step restores those rows from theta and
writes its own. A table whose parameter changed in place since (an optimizer step, checked by its
version counter) is copied whole again, and a tied table whose gradient comes back dense (an MLM
decoder sharing the word embeddings) takes the dense step.

``loss_fn(model, batch) -> scalar Tensor`` is the user's loss; it receives either the module
itself (at theta) or a stand-in that calls the module with theta' (attribute access is forwarded
to the module, so ``model.config`` and the like work). The default, :func:`hf_loss`, is
``model(**batch).loss`` for Hugging Face models. The module is used as it is (train or eval mode
is the caller's choice: dropout at theta and theta' follows it).

The slow, obvious computation (deepcopy the module, update its parameters in place, evaluate) is
not part of fastmft: benchmarks/baselines/clone_utility.py, the baseline of
benchmarks/bench_utility.py and the reference the tests compare against.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastmft.ops import _checks
from fastmft.ops.inner_step import FlatParams, NonFiniteError, inner_step

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
    theta' has an inf or NaN does: ``"raise"`` (:class:`fastmft.NonFiniteError`),
    ``"-inf"`` (that step contributes -inf to the utility, the task is never picked), or
    ``"ignore"`` (no check; NaN spreads into the utility). ``sparse_embeddings``: the row-sparse
    step for ``nn.Embedding`` tables (module docstring); it sets their ``sparse`` flag during
    :meth:`step`, so do not run the same module's backward from another thread meanwhile.
    ``precondition(i, grad) -> grad``: optional map applied to the gradient of ``self.names[i]``
    (dense, or sparse COO for a row-sparse table) before the step, e.g. the real optimizer's
    preconditioning (:meth:`fastmft.pipelines.selection.TaskSelector.adam_precondition`); settable any time.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        lr: float = 1e-3,
        *,
        params: Iterable[str] | None = None,
        nonfinite: str = "raise",
        sparse_embeddings: bool = True,
        precondition: Callable[[int, Tensor], Tensor] | None = None,
    ):
        if nonfinite not in ("raise", "-inf", "ignore"):
            raise ValueError(f"nonfinite must be 'raise', '-inf' or 'ignore', got {nonfinite!r}")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else hf_loss
        self.lr = float(lr)
        self.nonfinite = nonfinite
        self.precondition = precondition
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
        # (index into names, module) of the embedding tables that take the row-sparse step;
        # max_norm tables are left out (their forward renormalises the weight in place).
        self._tables: list[tuple[int, nn.Embedding]] = []
        if sparse_embeddings:
            index = {id(named[n]): i for i, n in enumerate(names)}
            self._tables = [
                (index[id(m.weight)], m)
                for m in model.modules()
                if isinstance(m, nn.Embedding) and m.max_norm is None and id(m.weight) in index
            ]
        # index -> (parameter, its data_ptr and version when theta' was written, rows that differ)
        self._dirty_rows: dict[int, tuple[Tensor, int, int, Tensor]] = {}

    def _params(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    def step(self, source_batch) -> dict[str, Tensor] | None:
        """theta' = theta - lr * grad L_source(theta), written into the scorer's flat buffer.

        Returns ``{name: view}`` of theta' (valid until the next step), or None when theta' is not
        finite and ``nonfinite="-inf"``.
        """
        params = self._params()
        tables = [m for _, m in self._tables if not m.sparse]
        for m in tables:
            m.sparse = True
        try:
            with torch.enable_grad():
                loss = self.loss_fn(self.model, source_batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for m in tables:
                m.sparse = False
        del loss
        if self.precondition is not None:
            grads = [None if g is None else self.precondition(i, g) for i, g in enumerate(grads)]
        check = self.nonfinite != "ignore"
        nonfinite = False
        sparse = set()
        for i, _ in self._tables:
            if grads[i] is not None and grads[i].is_sparse:
                nonfinite |= self._row_sparse_step(i, params[i], grads[i], check)
                sparse.add(i)
            else:
                self._dirty_rows.pop(i, None)  # the dense step below rewrites the whole table
        dense = [i for i in range(len(params)) if i not in sparse]
        try:
            inner_step(
                [params[i] for i in dense],
                [grads[i] for i in dense],
                self.lr,
                out=[self.flat.views[i] for i in dense],
                check_finite=check,
            )
        except NonFiniteError:
            nonfinite = True
        if self.nonfinite == "raise":
            _checks.finite("TaskUtilityScorer: theta - lr * grad", flag=nonfinite)
        return None if nonfinite else self._adapted

    def _row_sparse_step(self, i: int, param: Tensor, grad: Tensor, check: bool) -> bool:
        """theta' of table ``i`` = theta with the rows of the sparse ``grad`` stepped; returns
        whether a stepped row is non-finite (when ``check``)."""
        out = self.flat.views[i]
        with torch.no_grad():
            theta = param.detach()
            state = self._dirty_rows.get(i)
            if state is None or state[0] is not param or state[1:3] != (theta.data_ptr(), theta._version):
                out.copy_(theta)
            else:
                out.index_copy_(0, state[3], theta.index_select(0, state[3]))
            grad = grad.coalesce()
            rows = grad.indices()[0]
            # torch.add: the same arithmetic as the dense reference step (fp32 math for half types)
            stepped = torch.add(theta.index_select(0, rows), grad.values(), alpha=-self.lr)
            out.index_copy_(0, rows, stepped)
            self._dirty_rows[i] = (param, theta.data_ptr(), theta._version, rows)
            return check and not bool(torch.isfinite(stepped).all())

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
