"""MFTLoss against the float64 oracle of the paper's formula, and shuffle_domains."""

import pytest
import torch

import fastmft
from tests.helpers import assert_close
from tests.oracles import mft_loss64


def batch(N, T, D, layers, rng):
    hs = tuple(torch.randn(N, T, D, generator=rng) for _ in range(layers + 1))
    mask = torch.ones(N, T, dtype=torch.long)
    mask[:, T // 2 :] = (torch.rand(N, T - T // 2, generator=rng) < 0.5).long()
    return hs, mask


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmft.use_backend("torch"):
        yield


def _forward_matches_oracle(module, hs, mask, labels, domains, t, corrupted):
    """The module's three losses against the float64 oracle; returns the module's output."""
    out = module(hs, mask, labels, domains, typicality=t, corrupted=corrupted)
    loss, tlc, sdc = mft_loss64(module, hs, mask, labels, domains, t, corrupted)
    assert_close(out.label_loss, tlc, torch.float32)
    assert_close(out.domain_loss, sdc, torch.float32)
    assert_close(out.loss, loss, torch.float32)
    return out


def test_loss_matches_formula(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    module = fastmft.MFTLoss(hidden_size=8, num_labels=3, num_domains=4, layers=(1, 3, 4), lam=0.3)
    hs, mask = batch(10, 7, 8, 4, rng)
    labels = torch.randint(0, 3, (10,), generator=rng)
    domains = torch.randint(0, 4, (10,), generator=rng)
    t = torch.rand(10, generator=rng)
    corrupted = fastmft.shuffle_domains(domains, rng)
    out = _forward_matches_oracle(module, hs, mask, labels, domains, t, corrupted)
    assert out.logits.shape == (10, 3) and len(out.domain_logits) == 3


def test_parameters_are_the_documented_modules():
    module = fastmft.MFTLoss(hidden_size=6, num_labels=2, num_domains=3, layers=(2, 4))
    assert isinstance(module.label_head, torch.nn.Linear) and module.label_head.out_features == 2
    assert [h.out_features for h in module.domain_heads] == [3, 3]
    assert module.domain_embedding.weight.shape == (3, 6)
    expected = 6 * 2 + 2 + 2 * (6 * 3 + 3) + 3 * 6
    assert sum(p.numel() for p in module.parameters()) == expected


def test_zero_typicality_instance_gives_no_gradient(rng):
    module = fastmft.MFTLoss(hidden_size=8, num_labels=2, num_domains=2, layers=(1, 2))
    hs, mask = batch(6, 5, 8, 2, rng)
    hs = tuple(h.requires_grad_() for h in hs)
    t = torch.ones(6)
    t[2] = 0.0
    labels = torch.randint(0, 2, (6,), generator=rng)
    domains = torch.randint(0, 2, (6,), generator=rng)
    module(hs, mask, labels, domains, typicality=t, generator=rng).loss.backward()
    for h in hs[1:]:
        assert torch.all(h.grad[2] == 0)
        assert h.grad[0].abs().sum() > 0


def test_default_corruption_is_a_permutation(rng):
    domains = torch.randint(0, 5, (50,), generator=rng)
    shuffled = fastmft.shuffle_domains(domains, rng)
    assert torch.equal(torch.sort(shuffled).values, torch.sort(domains).values)
    a = fastmft.shuffle_domains(domains, torch.Generator().manual_seed(3))
    b = fastmft.shuffle_domains(domains, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_skip_layers_default():
    assert fastmft.skip_layers(12) == (4, 8, 12)
    assert fastmft.skip_layers(6) == (2, 4, 6)


def test_bad_input(rng):
    module = fastmft.MFTLoss(hidden_size=4, num_labels=2, num_domains=2, layers=(4, 8, 12))
    hs, mask = batch(3, 4, 4, 6, rng)
    with pytest.raises(ValueError, match=r"need hidden_states\[12\]"):
        module(hs, mask, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    module = fastmft.MFTLoss(hidden_size=4, num_labels=2, num_domains=2, layers=(1, 2))
    with pytest.raises(ValueError, match="domains holds 2"):
        module(hs, mask, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels holds 5"):
        module(hs, mask, torch.tensor([0, 5, 1]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="layers must be"):
        fastmft.MFTLoss(hidden_size=4, num_labels=2, num_domains=2, layers=(0, 2))


def test_errors_name_the_users_layer_and_the_hidden_size(rng):
    """Issue 13: a bad skip layer is named by its layer number, a wrong hidden size by name."""
    hs, mask = batch(3, 4, 4, 3, rng)
    y = torch.zeros(3, dtype=torch.long)
    module = fastmft.MFTLoss(hidden_size=4, num_labels=2, num_domains=2, layers=(1, 2))
    bad = list(hs)
    bad[2] = bad[2][:, :2]
    with pytest.raises(ValueError, match=r"hidden_states\[2\] \(skip layer 2\) has shape \(3, 2, 4\)"):
        module(tuple(bad), mask, y, y)
    wide = fastmft.MFTLoss(hidden_size=8, num_labels=2, num_domains=2, layers=(1, 2))
    with pytest.raises(ValueError, match="hidden size 4, but this MFTLoss was built with hidden_size=8"):
        wide(hs, mask, y, y)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_multi_prototypes_refuse_a_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fastmft.MultiPrototypes(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, dtype=torch.long), temperature)


def test_negative_typicality_contributes_nothing(rng):
    """t < 0 is clamped at 0 (the formula with max(t, 0)): its row adds nothing to the loss and
    gets zero gradient, against the float64 oracle (which weights rows by max(t, 0))."""
    module = fastmft.MFTLoss(hidden_size=8, num_labels=3, num_domains=3, layers=(1, 2), lam=0.5)
    hs, mask = batch(9, 6, 8, 2, rng)
    hs = tuple(h.requires_grad_() for h in hs)
    labels = torch.randint(0, 3, (9,), generator=rng)
    domains = torch.randint(0, 3, (9,), generator=rng)
    t = torch.rand(9, generator=rng)
    t[[1, 5]] = -0.1 - torch.rand(2, generator=rng)
    t.requires_grad_()
    corrupted = fastmft.shuffle_domains(domains, rng)
    out = _forward_matches_oracle(module, hs, mask, labels, domains, t, corrupted)
    out.loss.backward()
    for h in hs[1:]:
        assert torch.all(h.grad[[1, 5]] == 0)
        assert h.grad[0].abs().sum() > 0
    assert torch.all(t.grad[[1, 5]] == 0)
