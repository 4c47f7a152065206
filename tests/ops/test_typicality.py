"""Prototypes and typicality (reference backend) against the float64 oracles."""

import pytest
import torch

import fastmft
from tests.helpers import assert_close
from tests.oracles import prototypes64, typicality64


def rows(N, D, M, K, rng, dtype=torch.float32):
    e = torch.randn(N, D, generator=rng).to(dtype)
    return e, torch.randint(0, M, (N,), generator=rng), torch.randint(0, K, (N,), generator=rng)


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmft.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_prototypes(dtype, rng):
    e, y, d = rows(40, 7, 3, 4, rng, dtype)
    y[d == 2] = 0  # cells (2, 1) and (2, 2) are empty
    P = fastmft.class_prototypes(e, y, d, num_labels=3, num_domains=4)
    centers, counts = prototypes64(e, y, d, 3, 4)
    assert P.centers.dtype == torch.float32 and P.counts.dtype == torch.int64
    assert torch.equal(P.counts, counts)
    assert torch.all(P.centers[2, 1:] == 0)
    assert_close(P.centers, centers, torch.float32)


def test_accumulator_streaming_and_merge_equal_one_shot(rng):
    e, y, d = rows(50, 5, 2, 3, rng)
    one_shot = fastmft.class_prototypes(e, y, d, 2, 3)
    a = fastmft.PrototypeAccumulator(2, 3, 5)
    b = fastmft.PrototypeAccumulator(2, 3, 5)
    for s in range(0, 30, 7):
        a.update(e[s : min(s + 7, 30)], y[s : min(s + 7, 30)], d[s : min(s + 7, 30)])
    b.update(e[30:], y[30:], d[30:])
    merged = a.merge(b).result()
    assert torch.equal(merged.counts, one_shot.counts)
    assert_close(merged.centers, prototypes64(e, y, d, 2, 3)[0], torch.float32)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_typicality_matches_formula(alpha, dtype, rng):
    e, y, d = rows(60, 9, 3, 4, rng, dtype)
    y[(d == 3) & (y == 2)] = 1  # cell (3, 2) is empty: the other-domain mean skips it
    d[y == 0] = 1  # class 0 exists in one domain only: t = own cosine
    P = fastmft.class_prototypes(e, y, d, 3, 4)
    t = fastmft.typicality(e, y, d, P, alpha=alpha)
    assert t.shape == (60,) and t.dtype == torch.float32
    assert_close(t, typicality64(e, y, d, P.centers, P.counts, alpha), torch.float32)
    only_domain = y == 0  # t is the own cosine: typicality with alpha = 1
    own = typicality64(e, y, d, P.centers, P.counts, 1.0)
    assert_close(t[only_domain], own[only_domain], torch.float32)


def test_single_domain_is_own_cosine(rng):
    e, y, _ = rows(20, 6, 2, 1, rng)
    d = torch.zeros(20, dtype=torch.long)
    P = fastmft.class_prototypes(e, y, d, 2, 1)
    t = fastmft.typicality(e, y, d, P, alpha=0.3)
    assert_close(t, typicality64(e, y, d, P.centers, P.counts, 1.0), torch.float32)  # the own cosine


def test_zero_vectors_use_the_epsilon_contract(rng):
    e, y, d = rows(12, 4, 2, 2, rng)
    e[0] = 0.0
    P = fastmft.class_prototypes(e, y, d, 2, 2)
    t = fastmft.typicality(e, y, d, P)
    assert t[0] == 0 and torch.isfinite(t).all()


def test_cosine_below_eps_shrinks_with_the_norm(rng):
    """|x| < 1e-8: cos(x, c) = |x| / 1e-8 times the direction's cosine (the eps contract, not
    scale-free), so rows scaled by 1e-30 get 1e-22 |x| times the typicality of their direction."""
    e, y, d = rows(30, 8, 2, 3, rng)
    P = fastmft.class_prototypes(e, y, d, 2, 3)
    tiny = e * 1e-30
    t = fastmft.typicality(tiny, y, d, P).double()
    # the same float32 values at unit scale (exact to float64 rounding; `e` itself differs from
    # them by float32 rounding, which near-cancelling typicalities would amplify)
    direction = typicality64(tiny.double() * 1e30, y, d, P.centers, P.counts, 0.5)
    expected = typicality64(tiny, y, d, P.centers, P.counts, 0.5)
    norms = tiny.double().norm(dim=1)
    assert torch.allclose(expected, norms / 1e-8 * direction, rtol=1e-9, atol=0)  # the oracle itself
    # Compared at the direction's scale (the values are ~1e-22): a relative test on each value
    # would fail where the direction's typicality is a near-cancelling difference close to zero.
    assert_close(t * 1e-8 / norms, direction, torch.float32)


def test_large_n_is_chunked_exactly(rng, monkeypatch):
    import fastmft.ops.reference as ref

    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 64)  # forces many chunks
    e, y, d = rows(300, 8, 2, 3, rng)
    P = fastmft.class_prototypes(e, y, d, 2, 3)
    t = fastmft.typicality(e, y, d, P)
    assert_close(t, typicality64(e, y, d, P.centers, P.counts, 0.5), torch.float32)


def test_multi_prototype_typicality(rng):
    e, y, d = rows(80, 6, 2, 3, rng)
    d[(y == 1)] = torch.where(d[(y == 1)] == 2, 0, d[(y == 1)])  # cell (2, 1) empty
    keep = torch.ones(80, dtype=torch.bool)
    keep[(d == 1) & (y == 0)] = False
    keep[torch.nonzero((d == 1) & (y == 0))[0]] = True  # cell (1, 0) has one row: J=3 leaves 2 slots empty
    e, y, d = e[keep], y[keep], d[keep]
    MP = fastmft.multi_prototypes(e, y, d, 2, 3, num_prototypes=3, generator=rng)
    assert MP.centers.shape == (3, 2, 3, 6)
    assert torch.equal(MP.counts.sum(-1), fastmft.class_prototypes(e, y, d, 2, 3).counts)
    assert MP.counts[1, 0].tolist().count(0) == 2
    t = fastmft.typicality(e, y, d, MP, alpha=0.5)
    assert_close(t, typicality64(e, y, d, MP.centers, MP.counts, 0.5, MP.temperature), torch.float32)


def test_one_prototype_per_cell_equals_single(rng):
    e, y, d = rows(30, 5, 2, 2, rng)
    MP = fastmft.multi_prototypes(e, y, d, 2, 2, num_prototypes=1, generator=rng)
    P = fastmft.class_prototypes(e, y, d, 2, 2)
    assert_close(fastmft.typicality(e, y, d, MP), fastmft.typicality(e, y, d, P).double(), torch.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels=torch.tensor([0, 3, 1, 0])), ValueError, "labels holds 3, outside"),
        (dict(domains=torch.tensor([0, -1, 1, 0])), ValueError, "domains holds -1"),
        (dict(labels=torch.tensor([0.0, 1.0, 1.0, 0.0])), TypeError, "labels must be an integer"),
        (dict(labels=torch.tensor([0, 1, 1])), ValueError, "labels has 3 entries, expected 4"),
        (dict(embeddings=torch.randn(4, 6)), ValueError, "embeddings have dim 6"),
        (dict(embeddings=torch.randn(4, 5, 1)), ValueError, "embeddings must be 2-D"),
        (dict(alpha=1.5), ValueError, "alpha must lie in"),
        (dict(prototypes="nope"), TypeError, "prototypes must be"),
    ],
)
def test_typicality_bad_input(change, error, match):
    args = dict(
        embeddings=torch.randn(4, 5),
        labels=torch.tensor([0, 1, 1, 0]),
        domains=torch.tensor([0, 1, 1, 0]),
    )
    protos = fastmft.class_prototypes(args["embeddings"], args["labels"], args["domains"], 3, 2)
    args.update(prototypes=protos, alpha=0.5)
    args.update(change)
    with pytest.raises(error, match=match):
        fastmft.typicality(args["embeddings"], args["labels"], args["domains"], args["prototypes"], alpha=args["alpha"])


def test_class_prototypes_bad_input():
    e = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels holds 2"):
        fastmft.class_prototypes(e, torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.long), 2, 1)
    with pytest.raises(ValueError, match="num_domains must be a positive int"):
        fastmft.class_prototypes(e, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2, 0)
