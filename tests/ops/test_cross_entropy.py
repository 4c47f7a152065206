"""multi_head_cross_entropy (reference backend) against the float64 oracle."""

import pytest
import torch

import fastmft
from tests.helpers import assert_close
from tests.oracles import mhce64


def heads(N, classes, dtype, rng, ignore=0.0):
    logits = [(3 * torch.randn(N, c, generator=rng)).to(dtype) for c in classes]
    targets = []
    for c in classes:
        y = torch.randint(0, c, (N,), generator=rng)
        y[torch.rand(N, generator=rng) < ignore] = -100
        targets.append(y)
    return logits, targets


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmft.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weighted_heads(dtype, rng):
    logits, targets = heads(17, [3, 4, 4, 2], dtype, rng, ignore=0.2)
    t = torch.rand(17, generator=rng)
    w = [0.5, 0.25, 1.0, 2.0]
    out = fastmft.multi_head_cross_entropy(logits, targets, sample_weight=t, head_weight=w)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close(out, mhce64(logits, targets, t, w), torch.float32)


def test_defaults_equal_torch_cross_entropy(rng):
    logits, targets = heads(9, [5], torch.float32, rng)
    out = fastmft.multi_head_cross_entropy(logits[0], targets[0])
    assert_close(out, mhce64(logits, targets), torch.float32)


def test_all_ignored_head_contributes_zero(rng):
    logits, targets = heads(6, [3, 2], torch.float32, rng)
    targets[1][:] = -1
    out = fastmft.multi_head_cross_entropy(logits, targets, ignore_index=-1)
    assert_close(out, mhce64(logits[:1], targets[:1]), torch.float32)


def test_gradcheck_logits_and_sample_weight(rng):
    logits, targets = heads(5, [3, 4], torch.float64, rng, ignore=0.3)
    logits = [x.requires_grad_() for x in logits]
    t = torch.rand(5, generator=rng, dtype=torch.float64, requires_grad=True)

    def f(a, b, t):
        return fastmft.multi_head_cross_entropy([a, b], targets, sample_weight=t, head_weight=[0.3, 1.5])

    # CE is computed in float32 by contract: gradcheck with float32-sized tolerances.
    assert torch.autograd.gradcheck(f, (*logits, t), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_gradient_formula(rng):
    logits, targets = heads(7, [4], torch.float32, rng, ignore=0.3)
    x = logits[0].requires_grad_()
    t = torch.rand(7, generator=rng)
    fastmft.multi_head_cross_entropy([x], targets, sample_weight=t).backward()
    keep = targets[0] != -100
    p = torch.softmax(x.detach().double(), 1)
    onehot = torch.nn.functional.one_hot(targets[0].clamp_min(0), 4).double()
    expected = (p - onehot) * (t.double() * keep)[:, None] / keep.sum()
    assert_close(x.grad, expected, torch.float32)


@pytest.mark.parametrize(
    "logits, targets, kwargs, error, match",
    [
        ([torch.randn(4, 3)], [torch.tensor([0, 1, 3, 0])], {}, ValueError, r"targets\[0\] holds 3"),
        ([torch.randn(4, 3)], [torch.tensor([0, 1, -5, 0])], {}, ValueError, r"holds -5.*or -100 to ignore"),
        (
            [torch.randn(4, 3), torch.randn(5, 2)],
            [torch.zeros(4, dtype=torch.long)] * 2,
            {},
            ValueError,
            r"logits\[1\] has 5 rows",
        ),
        ([torch.randn(4, 3)], [torch.zeros(4, dtype=torch.long)] * 2, {}, ValueError, "1 heads but targets has 2"),
        ([torch.randn(4, 3)], [torch.zeros(4)], {}, TypeError, "must be an integer tensor"),
        (
            [torch.randn(4, 3)],
            [torch.zeros(4, dtype=torch.long)],
            dict(sample_weight=torch.ones(3)),
            ValueError,
            "sample_weight has 3",
        ),
        (
            [torch.randn(4, 3)],
            [torch.zeros(4, dtype=torch.long)],
            dict(head_weight=[1.0, 2.0]),
            ValueError,
            "head_weight has 2",
        ),
        ([], [], {}, ValueError, "logits is empty"),
        (torch.randn(4, 3), [torch.zeros(4, dtype=torch.long)], {}, TypeError, "both be sequences"),
    ],
)
def test_bad_input(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastmft.multi_head_cross_entropy(logits, targets, **kwargs)
