"""masked_mean_pool (reference backend) against the float64 oracle."""

import pytest
import torch

import fastmft
from tests.helpers import assert_close
from tests.oracles import pool64


def random_mask(B, T, dtype, rng):
    m = torch.rand(B, T, generator=rng) < 0.6
    m[0] = False  # an all-masked row
    if B > 1:
        m[1] = True
    if dtype == torch.bool:
        return m
    if dtype.is_floating_point:
        return m.to(dtype) * torch.rand(B, T, generator=rng).add(0.5).to(dtype)  # nonzero = valid
    return m.to(dtype)


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmft.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32])
@pytest.mark.parametrize("skip_cls", [False, True])
def test_single_layer(dtype, mask_dtype, skip_cls, rng):
    B, T, D = 5, 11, 13
    h = torch.randn(B, T, D, generator=rng).to(dtype)
    mask = random_mask(B, T, mask_dtype, rng)
    out = fastmft.masked_mean_pool(h, mask, skip_cls=skip_cls)
    assert out.shape == (B, D) and out.dtype == dtype
    assert_close(out, pool64([h], mask, skip_cls)[0], dtype)
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("as_list", [False, True])
def test_stacked_layers_and_strided_input(as_list, rng):
    L, B, T, D = 3, 4, 9, 6
    base = torch.randn(B, T, L, D, generator=rng)
    layers = [base[:, :, i] for i in range(L)]  # non-contiguous views, as from a fused projection
    mask = random_mask(B, T, torch.int64, rng)
    hs = layers if as_list else torch.stack(layers)
    out = fastmft.masked_mean_pool(hs, mask, skip_cls=True)
    assert out.shape == (L, B, D)
    assert_close(out, pool64(layers, mask, True), torch.float32)


def test_padding_values_never_leak(rng):
    h = torch.randn(3, 6, 4, generator=rng)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 4:] = False
    h[:, 4:] = float("nan")
    out = fastmft.masked_mean_pool(h, mask)
    assert torch.isfinite(out).all()
    assert_close(out, pool64([h], mask, False)[0], torch.float32)


def test_gradcheck_float64(rng):
    h = torch.randn(2, 3, 5, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: fastmft.masked_mean_pool(x, mask, skip_cls=True), (h,))


def test_gradient_is_mask_over_count(rng):
    h = torch.randn(2, 4, 3, generator=rng, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]])
    fastmft.masked_mean_pool(h, mask).sum().backward()
    h64 = h.detach().double().requires_grad_()
    pool64([h64], mask, False).sum().backward()
    assert_close(h.grad, h64.grad, torch.float32)


def test_empty_batch():
    out = fastmft.masked_mean_pool(torch.zeros(0, 3, 4), torch.zeros(0, 3))
    assert out.shape == (0, 4)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 3), torch.ones(2, 3)), ValueError, "hidden_states must be 3-D or 4-D"),
        ((torch.randn(2, 3, 4), torch.ones(2, 4)), ValueError, "attention_mask is"),
        ((torch.randn(2, 3, 4), torch.ones(2, 3, 1)), ValueError, "attention_mask must be 2-D"),
        ((torch.randint(0, 3, (2, 3, 4)), torch.ones(2, 3)), TypeError, "hidden_states must be float"),
        (([torch.randn(2, 3, 4), torch.randn(2, 3, 5)], torch.ones(2, 3)), ValueError, r"hidden_states\[1\]"),
        (([], torch.ones(2, 3)), ValueError, "empty sequence"),
        ((torch.randn(2, 3, 4), [[1, 1, 1]]), TypeError, "attention_mask must be a torch.Tensor"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fastmft.masked_mean_pool(*args)
