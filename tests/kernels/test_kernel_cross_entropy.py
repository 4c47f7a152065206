"""Triton weighted multi-head cross-entropy (interpreter) against a float64 formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmft
from fastmft.kernels import _util
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
