"""Triton masked mean pooling (interpreter) against a float64 reference, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmft
from fastmft.kernels import _util
from fastmft.ops import triton as triton_ops
from tests.helpers import DEVICE
from tests.helpers import assert_kernel_close as assert_close
from tests.oracles import pool64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN: an element the kernel forgets to write fails the test."""
    monkeypatch.setattr(_util, "POISON", True)


def _layers(L, B, T, D, dtype, layout, g):
    if layout == "contiguous":
        return [torch.randn(B, T, D, generator=g).to(DEVICE).to(dtype) for _ in range(L)]
    if layout == "sliced":  # views into a wider buffer: row stride != T * D
        return [torch.randn(B, T, D + 3, generator=g).to(DEVICE).to(dtype)[..., 1 : D + 1] for _ in range(L)]
    if layout == "transposed":  # [T, B, D] storage seen as [B, T, D]
        return [torch.randn(T, B, D, generator=g).to(DEVICE).to(dtype).transpose(0, 1) for _ in range(L)]
    if layout == "d_strided":  # D not contiguous
        return [torch.randn(B, T, 2 * D, generator=g).to(DEVICE).to(dtype)[..., ::2] for _ in range(L)]
    stacked = torch.randn(L, B, T, D, generator=g).to(DEVICE).to(dtype)  # "stacked": views of one tensor
    return list(stacked.unbind(0))


def _mask(B, T, mask_dtype, g):
    valid = torch.rand(B, T, generator=g).to(DEVICE) > 0.4
    if B > 1 or torch.rand((), generator=g).to(DEVICE) < 0.25:
        valid[-1] = False  # an all-masked row (for B = 1: the whole batch, now and then)
    if mask_dtype == torch.bool:
        return valid
    if mask_dtype.is_floating_point:  # any nonzero value is valid, not only 1
        return (valid * (0.5 + torch.rand(B, T, generator=g).to(DEVICE))).to(mask_dtype)
    return valid.to(mask_dtype)


@settings(max_examples=15, deadline=None)
@given(
    L=st.integers(1, 3),
    B=st.integers(1, 4),
    T=st.integers(1, 40),
    D=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    mask_dtype=st.sampled_from(MASK_DTYPES),
    skip_cls=st.booleans(),
    layout=st.sampled_from(["contiguous", "sliced", "transposed", "d_strided", "stacked"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pool_forward_backward_vs_float64(L, B, T, D, dtype, mask_dtype, skip_cls, layout, seed):
    g = torch.Generator().manual_seed(seed)
    layers = [h.requires_grad_() for h in (x.detach() for x in _layers(L, B, T, D, dtype, layout, g))]
    mask = _mask(B, T, mask_dtype, g)
    with fastmft.use_backend("triton"):
        out = fastmft.masked_mean_pool(layers, mask, skip_cls=skip_cls)
    assert type(out.grad_fn).__name__.startswith("_MaskedMeanPool")
    assert out.shape == (L, B, D) and out.dtype == dtype
    ref_layers = [h.detach().double().requires_grad_() for h in layers]
    ref = pool64(ref_layers, mask, skip_cls)
    assert_close(out, ref, dtype)
    grad = torch.randn(L, B, D, generator=g).to(DEVICE).to(dtype)
    out.backward(grad)
    ref.backward(grad.double())
    for h, r in zip(layers, ref_layers):
        assert h.grad.shape == h.shape and h.grad.dtype == dtype
        assert_close(h.grad, r.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_single_and_stacked_inputs(dtype, rng):
    B, T, D = 3, 19, 45
    x = torch.randn(2, B, T, D, generator=rng).to(DEVICE).to(dtype).requires_grad_()
    mask = torch.rand(B, T, generator=rng).to(DEVICE) > 0.5
    with fastmft.use_backend("triton"):
        one = fastmft.masked_mean_pool(x[1], mask)
        both = fastmft.masked_mean_pool(x, mask, skip_cls=True)
    assert one.shape == (B, D) and both.shape == (2, B, D)
    assert_close(one, pool64([x[1].detach()], mask, False)[0], dtype)
    assert_close(both, pool64(list(x.detach()), mask, True), dtype)
    # A gradient that is not contiguous (zero strides from the sum, a select): strides are honoured.
    (one.float().sum() + both[0].float().sum()).backward()
    xr = x.detach().double().requires_grad_()
    (pool64([xr[1]], mask, False)[0].sum() + pool64(list(xr), mask, True)[0].sum()).backward()
    assert_close(x.grad, xr.grad, dtype)


def test_pool_padding_values_never_leak(rng):
    B, T, D = 2, 9, 20
    x = torch.randn(B, T, D, generator=rng).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.int64, device=DEVICE)
    mask[:, 5:] = 0
    x[:, 5:] = float("nan")
    x[:, 0] = float("inf")  # [CLS] excluded by skip_cls
    with fastmft.use_backend("triton"):
        out = fastmft.masked_mean_pool(x, mask, skip_cls=True)
    assert torch.isfinite(out).all()
    assert_close(out, pool64([x], mask, True)[0], torch.float32)


def test_pool_float64_runs_the_reference(monkeypatch, rng):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run for float64")

    monkeypatch.setattr(triton_ops._pool, "pool_forward", boom)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=rng).to(DEVICE)
    mask = torch.ones(2, 5, device=DEVICE)
    with fastmft.use_backend("triton"):
        out = fastmft.masked_mean_pool(x, mask)
    assert out.dtype == torch.float64
    assert_close(out, pool64([x], mask, False)[0], torch.float64)


def test_pool_layers_of_different_layouts_in_one_launch(rng):
    """Each program picks its layer's pointer and strides at run time: three layers with three
    different layouts (and a T spanning several pipelined tiles) pool as the oracle does."""
    B, T, D = 3, 70, 40
    layers = [
        torch.randn(B, T, D, generator=rng).to(DEVICE),
        torch.randn(T, B, D, generator=rng).to(DEVICE).transpose(0, 1),
        torch.randn(B, T, 2 * D, generator=rng).to(DEVICE)[..., ::2],
    ]
    mask = _mask(B, T, torch.bool, rng)
    with fastmft.use_backend("triton"):
        out = fastmft.masked_mean_pool(layers, mask, skip_cls=True)
    assert_close(out, pool64(layers, mask, True), torch.float32)
