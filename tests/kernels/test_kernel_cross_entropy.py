"""Triton weighted multi-head cross-entropy (interpreter) against a float64 formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmft
from fastmft.kernels import _util, cross_entropy
from tests.helpers import DEVICE
from tests.helpers import assert_kernel_close as assert_close
from tests.oracles import mhce64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_util, "POISON", True)


def _worst(dtypes):
    return max(dtypes, key=lambda d: DTYPES.index(d))


@settings(max_examples=15, deadline=None)
@given(
    N=st.integers(1, 300),
    classes=st.lists(st.sampled_from([1, 2, 3, 4, 5, 7, 10, 97]), min_size=1, max_size=4),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
    weight=st.sampled_from([None, torch.float32, torch.bfloat16]),
    weight_grad=st.booleans(),
    head_weights=st.booleans(),
    ignore_index=st.sampled_from([-100, 0, 3]),
    ignored=st.sampled_from([0.0, 0.3, 1.0]),
    layout=st.sampled_from(["contiguous", "strided", "column_major"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_mhce_forward_backward_vs_float64(
    N, classes, dtypes, weight, weight_grad, head_weights, ignore_index, ignored, layout, seed
):
    g = torch.Generator().manual_seed(seed)
    H = len(classes)
    dtypes = dtypes[:H]
    logits = []
    for C, dt in zip(classes, dtypes):
        if layout == "contiguous":
            x = torch.randn(N, C, generator=g).to(DEVICE)
        elif layout == "strided":
            x = torch.randn(N, 2 * C, generator=g).to(DEVICE)[:, ::2]
        else:
            x = torch.randn(C, N, generator=g).to(DEVICE).t()
        logits.append((3 * x).to(dt).requires_grad_())
    targets = []
    for C in classes:
        y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
        y[torch.rand(N, generator=g).to(DEVICE) < ignored] = ignore_index
        targets.append(y)
    sw = None
    if weight is not None:
        sw = torch.rand(N, generator=g).to(DEVICE).to(weight).requires_grad_(weight_grad)
    hw = [float(v) for v in torch.rand(H, generator=g).to(DEVICE) * 2] if head_weights else None
    before = [x.detach().clone() for x in logits]
    with fastmft.use_backend("triton"):
        loss = fastmft.multi_head_cross_entropy(
            logits, targets, sample_weight=sw, head_weight=hw, ignore_index=ignore_index
        )
    assert type(loss.grad_fn).__name__.startswith("_MultiHeadCrossEntropy")
    assert loss.dtype == torch.float32 and loss.shape == ()
    ref_logits = [x.detach().double().requires_grad_() for x in logits]
    ref_sw = None if sw is None else sw.detach().double().requires_grad_(weight_grad)
    ref = mhce64(ref_logits, targets, ref_sw, hw, ignore_index)
    # The math is float32 whatever the logits dtype: the loss meets the float32 tolerance
    # (inputs are exact in every dtype), loosened only for the 16-bit weight.
    assert_close(loss, ref, torch.float32 if weight != torch.bfloat16 else torch.bfloat16)
    grad = torch.rand((), generator=g).to(DEVICE) + 0.5
    loss.backward(grad)
    ref.backward(grad.double())
    for x, r, b in zip(logits, ref_logits, before):
        assert torch.equal(x.detach(), b), "the user's logits were modified"
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert_close(x.grad, r.grad, _worst([x.dtype, weight or torch.float32]))
    if weight_grad and sw is not None:
        assert sw.grad.dtype == sw.dtype
        assert_close(sw.grad, ref_sw.grad, _worst(dtypes + [weight]))


def test_mhce_only_some_heads_need_grad(rng):
    a = torch.randn(20, 3, generator=rng).to(DEVICE).requires_grad_()
    b = torch.randn(20, 4, generator=rng).to(DEVICE)  # constant head
    ya, yb = torch.randint(0, 3, (20,), generator=rng).to(DEVICE), torch.randint(0, 4, (20,), generator=rng).to(DEVICE)
    with fastmft.use_backend("triton"):
        loss = fastmft.MultiHeadCrossEntropyLoss(head_weight=[0.5, 2.0])([a, b], [ya, yb])
    loss.backward()
    ar = a.detach().double().requires_grad_()
    ref = mhce64([ar, b], [ya, yb], None, [0.5, 2.0], -100)
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(a.grad, ar.grad, torch.float32)
    assert b.grad is None


def test_mhce_float64_and_empty_use_the_reference(rng):
    x = torch.randn(6, 3, dtype=torch.float64, generator=rng).to(DEVICE).requires_grad_()
    y = torch.randint(0, 3, (6,), generator=rng).to(DEVICE)
    with fastmft.use_backend("triton"):
        loss = fastmft.multi_head_cross_entropy([x], [y])
        empty = fastmft.multi_head_cross_entropy(
            [torch.randn(0, 3, device=DEVICE)], [torch.zeros(0, dtype=torch.int64, device=DEVICE)]
        )
    torch.testing.assert_close(loss, mhce64([x], [y], None, None, -100).float())
    assert float(empty) == 0.0


def _heads(N, classes, dtype, g, ignored=0.2):
    logits = [(3 * torch.randn(N, c, generator=g)).to(DEVICE).to(dtype).requires_grad_() for c in classes]
    targets = []
    for c in classes:
        y = torch.randint(0, c, (N,), generator=g).to(DEVICE)
        y[torch.rand(N, generator=g).to(DEVICE) < ignored] = -100
        targets.append(y)
    return logits, targets


def _against_oracle(logits, targets, sw, hw, dtype, grad=0.7):
    with fastmft.use_backend("triton"):
        loss = fastmft.multi_head_cross_entropy(logits, targets, sample_weight=sw, head_weight=hw)
    ref_logits = [x.detach().double().requires_grad_() for x in logits]
    ref_sw = None if sw is None else sw.detach().double().requires_grad_(sw.requires_grad)
    ref = mhce64(ref_logits, targets, ref_sw, hw)
    assert_close(loss, ref, torch.float32)
    loss.backward(torch.tensor(grad, device=DEVICE))
    ref.backward(torch.tensor(grad, dtype=torch.float64, device=DEVICE))
    for x, r in zip(logits, ref_logits):
        assert_close(x.grad, r.grad, dtype)
    if sw is not None and sw.requires_grad:
        assert_close(sw.grad, ref_sw.grad, dtype)
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_tile_and_streamed_heads(dtype, rng):
    """Heads of up to MAX_TILE_C classes are one tile in registers, wider ones stream the
    classes (online log-sum-exp, target picked chunk by chunk); both in one launch."""
    single = (1, 3, 4, cross_entropy.MAX_TILE_C)
    streamed = (cross_entropy.MAX_TILE_C + 1, 2 * cross_entropy.MAX_TILE_C + 3)
    widths = cross_entropy.tile(single + streamed)["BLOCK_C"]
    assert all(c <= w for c, w in zip(single, widths)) and all(c > w for c, w in zip(streamed, widths[4:]))
    logits, targets = _heads(37, single + streamed, dtype, rng)
    sw = torch.rand(37, generator=rng).to(DEVICE).requires_grad_()
    _against_oracle(logits, targets, sw, [1.0, 0.5, 2.0, 1.0, 0.25, 1.5], dtype)


def test_all_ignored_head_and_ignored_rows(rng):
    """Ignored rows get exactly zero gradient; a head with every row ignored adds 0 to the loss
    (kept = 0: s_h = w_h / max(0, 1)) and gets a zero gradient."""
    logits, targets = _heads(29, (3, 4, 97), torch.float32, rng, ignored=0.3)
    targets[1][:] = -100
    sw = torch.rand(29, generator=rng).to(DEVICE).requires_grad_()
    _against_oracle(logits, targets, sw, [1.0, 3.0, 0.5], torch.float32)
    assert torch.equal(logits[1].grad, torch.zeros_like(logits[1]))
    for x, y in ((logits[0], targets[0]), (logits[2], targets[2])):
        assert torch.equal(x.grad[y == -100], torch.zeros_like(x.grad[y == -100]))


def test_sample_weight_gradient_16_bit_weights(rng):
    """dL/dt_i = g sum_h s_h [i kept in h] CE_h,i, returned in the weights' dtype."""
    logits, targets = _heads(41, (2, 5, 70), torch.float32, rng)
    sw = torch.rand(41, generator=rng).to(DEVICE).to(torch.bfloat16).requires_grad_()
    _against_oracle(logits, targets, sw, [0.5, 1.0, 2.0], torch.bfloat16, grad=1.3)
    assert sw.grad.dtype == torch.bfloat16


def test_loss_is_bit_identical_across_runs(rng, monkeypatch):
    """Partials per program, summed in program order by the last program: the same bits on every
    run (several programs, several blocks each), gradients included."""
    monkeypatch.setattr(cross_entropy, "programs", lambda device, num_blocks: 3)
    logits, targets = _heads(1100, (3, 4, 4, 4), torch.bfloat16, rng)
    sw = torch.rand(1100, generator=rng).to(DEVICE)
    runs = []
    for _ in range(2):
        xs = [x.detach().requires_grad_() for x in logits]
        with fastmft.use_backend("triton"):
            loss = fastmft.multi_head_cross_entropy(xs, targets, sample_weight=sw)
        loss.backward()
        runs.append((loss.detach(), [x.grad for x in xs]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert_close(runs[0][0], mhce64(logits, targets, sw), torch.float32)
    ws, _ = cross_entropy._workspace(torch.device(DEVICE))
    assert int(ws[0]) == 0, "the ticket counter must be reset for the next launch"


def test_one_launch_forward_and_fused_gradient(rng, monkeypatch):
    """Forward: one launch; it writes G_h = t (softmax - onehot) only for heads that need a
    gradient (none under no_grad). Backward: one launch that scales G_h by g s_h."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launcher = InterpretedFunction if _util.interpreter() else JITFunction
    launches = []
    real_run = launcher.run
    monkeypatch.setattr(
        launcher, "run", lambda self, *a, **k: launches.append(self.fn.__name__) or real_run(self, *a, **k)
    )
    logits, targets = _heads(50, (3, 6), torch.float16, rng)
    sw = torch.rand(50, generator=rng).to(DEVICE)
    with torch.no_grad(), fastmft.use_backend("triton"):
        fastmft.multi_head_cross_entropy(logits, targets, sample_weight=sw)
    assert launches == ["_mhce_fwd_kernel"]
    fwd = cross_entropy.forward(logits, targets, sw, [1.0, 2.0], -100, grad_logits=(False, True))
    assert fwd.grads[0] is None and fwd.row_ce is None
    x, y = logits[1].detach().double(), targets[1]
    keep = (y != -100).double()[:, None]
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), 6).double()
    unscaled = sw.double()[:, None] * keep * (torch.softmax(x, 1) - onehot)
    assert_close(fwd.grads[1], unscaled, torch.float16)
    grads, grad_w = cross_entropy.backward(torch.tensor(0.5, device=DEVICE), fwd, None)
    assert grads[1] is fwd.grads[1] and grad_w is None  # scaled in place
    assert_close(grads[1], 0.5 * 2.0 / keep.sum() * unscaled, torch.float16)
    assert launches == ["_mhce_fwd_kernel", "_mhce_fwd_kernel", "_mhce_bwd_kernel"]


def test_second_backward_through_a_retained_graph(rng):
    """The fused gradient is handed out by the first backward; a second one (retain_graph)
    differentiates the reference instead and gives the same gradient."""
    logits, targets = _heads(23, (3, 80), torch.float32, rng)
    sw = torch.rand(23, generator=rng).to(DEVICE).requires_grad_()
    with fastmft.use_backend("triton"):
        loss = fastmft.multi_head_cross_entropy(logits, targets, sample_weight=sw, head_weight=[1.0, 0.5])
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in logits] + [sw.grad.clone()]
    loss.backward()
    for a, b in zip([x.grad for x in logits] + [sw.grad], first):
        assert_close(a, 2 * b, torch.float32)
