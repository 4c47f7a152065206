"""The foreach reference of inner_step and FlatParams against the float64 oracle theta - lr * grad."""

import pytest
import torch

import fastmft
from tests.helpers import assert_close
from tests.oracles import inner_step64


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmft.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inner_step_formula(dtype, rng):
    shapes = [(3, 5), (0,), (7,), (2, 3, 4), ()]
    params = [torch.randn(s, generator=rng).to(dtype).requires_grad_() for s in shapes]
    grads = [torch.randn(s, generator=rng).to(dtype) for s in shapes]
    grads[2] = None
    for out in (None, fastmft.FlatParams(params)):
        result = fastmft.inner_step(params, grads, 0.37, out=out)
        for p, r, expected in zip(params, result, inner_step64(params, grads, 0.37)):
            assert r.shape == p.shape and r.dtype == dtype and not r.requires_grad
            assert_close(r, expected, dtype)


def test_flat_params_views_share_one_buffer_per_dtype(rng):
    tensors = {
        "a": torch.randn(3, generator=rng),
        "b": torch.randn(2, 2, generator=rng).T,
        "c": torch.zeros(4, dtype=torch.float16),
    }
    flat = fastmft.FlatParams(tensors)
    assert len(flat.buffers) == 2
    assert flat.buffers[(torch.float32, torch.device("cpu"))].numel() == 7
    for name, view in flat.as_dict().items():
        assert torch.equal(view, tensors[name])
    ptr = flat.views[1].data_ptr()
    flat.copy_([torch.ones(3), torch.ones(2, 2), torch.ones(4, dtype=torch.float16)])
    assert flat.views[1].data_ptr() == ptr and torch.all(flat.views[1] == 1)


def test_inner_step_writes_into_out_in_place(rng):
    params = [torch.randn(4, generator=rng), torch.randn(2, 2, generator=rng)]
    grads = [torch.ones(4), torch.ones(2, 2)]
    flat = fastmft.FlatParams(params)
    result = fastmft.inner_step(params, grads, 0.5, out=flat)
    assert all(r.data_ptr() == v.data_ptr() for r, v in zip(result, flat.views))
    assert_close(flat.views[0], inner_step64(params, grads, 0.5)[0], torch.float32)


def test_inner_step_bad_input():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="params has 1 tensors but grads has 2"):
        fastmft.inner_step(p, [None, None], 0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] is \(4,\)"):
        fastmft.inner_step(p, [torch.zeros(4)], 0.1)
    with pytest.raises(ValueError, match=r"out\[0\] is"):
        fastmft.inner_step(p, [torch.zeros(3)], 0.1, out=[torch.zeros(3, dtype=torch.float16)])
