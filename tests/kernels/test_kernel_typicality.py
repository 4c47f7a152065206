"""Triton typicality and prototype sums (interpreter) against float64 formulas."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmft
from fastmft.kernels import _util
from fastmft.ops import triton as triton_ops
from tests.helpers import DEVICE
from tests.helpers import assert_kernel_close as assert_close
from tests.oracles import prototypes64, typicality64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_util, "POISON", True)


def _embeddings(N, D, dtype, layout, g):
    if layout == "contiguous":
        return torch.randn(N, D, generator=g).to(DEVICE).to(dtype)
    if layout == "strided":
        return torch.randn(N, 2 * D, generator=g).to(DEVICE).to(dtype)[:, ::2]
    return torch.randn(D, N, generator=g).to(DEVICE).to(dtype).t()  # column-major


@settings(max_examples=15, deadline=None)
@given(
    N=st.integers(1, 300),
    D=st.integers(1, 70),
    K=st.integers(1, 4),
    M=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    index_dtype=st.sampled_from([torch.int64, torch.int32]),
    layout=st.sampled_from(["contiguous", "strided", "column_major"]),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    drop_cells=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_prototypes_and_typicality_vs_float64(N, D, K, M, dtype, index_dtype, layout, alpha, drop_cells, seed):
    g = torch.Generator().manual_seed(seed)
    x = _embeddings(N, D, dtype, layout, g)
    y = torch.randint(0, M, (N,), generator=g).to(DEVICE).to(index_dtype)
    k = torch.randint(0, K, (N,), generator=g).to(DEVICE).to(index_dtype)
    with fastmft.use_backend("triton"):
        protos = fastmft.class_prototypes(x, y, k, M, K)
    centers64, counts64 = prototypes64(x, y, k, M, K)
    assert torch.equal(protos.counts, counts64)
    assert_close(protos.centers, centers64, dtype)
    if drop_cells:  # degenerate cells: empty (k', y) cells, including a row's own cell
        gone = torch.rand(K, M, generator=g).to(DEVICE) < 0.4
        protos = fastmft.Prototypes(
            protos.centers.masked_fill(gone[..., None], 0.0), protos.counts.masked_fill(gone, 0)
        )
    with fastmft.use_backend("triton"):
        t = fastmft.typicality(x, y, k, protos, alpha=alpha)
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert_close(t, typicality64(x, y, k, protos.centers, protos.counts, alpha), dtype)


def test_many_cells_and_row_chunks(rng):
    """81 cells (two cell blocks of 64) and enough rows for several row chunks per program grid."""
    N, D, K, M = 3000, 24, 9, 9
    x = torch.randn(N, D, generator=rng).to(DEVICE)
    y = torch.randint(0, M, (N,), generator=rng).to(DEVICE)
    k = torch.randint(0, K, (N,), generator=rng).to(DEVICE)
    with fastmft.use_backend("triton"):
        protos = fastmft.class_prototypes(x, y, k, M, K)
        t = fastmft.typicality(x, y, k, protos, alpha=0.5)
    centers64, counts64 = prototypes64(x, y, k, M, K)
    assert torch.equal(protos.counts, counts64)
    assert_close(protos.centers, centers64, torch.float32)
    assert_close(t, typicality64(x, y, k, protos.centers, protos.counts, 0.5), torch.float32)


def test_single_domain_and_lonely_class(rng):
    """K = 1 gives t = cos(own); a class present in one domain only also gives t = cos(own)."""
    x = torch.randn(40, 10, generator=rng).to(DEVICE)
    y = torch.randint(0, 3, (40,), generator=rng).to(DEVICE)
    k = torch.zeros(40, dtype=torch.int64, device=DEVICE)
    with fastmft.use_backend("triton"):
        protos = fastmft.class_prototypes(x, y, k, 3, 1)
        t = fastmft.typicality(x, y, k, protos, alpha=0.2)
    assert_close(t, typicality64(x, y, k, protos.centers, protos.counts, 1.0), torch.float32)  # the own cosine


def test_multi_prototypes_and_float64_use_the_reference(monkeypatch, rng):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run here")

    x = torch.randn(30, 8, generator=rng).to(DEVICE)
    y = torch.randint(0, 2, (30,), generator=rng).to(DEVICE)
    k = torch.randint(0, 2, (30,), generator=rng).to(DEVICE)
    multi = fastmft.multi_prototypes(x, y, k, 2, 2, 2, generator=rng)
    monkeypatch.setattr(triton_ops._typ, "typicality", boom)
    with fastmft.use_backend("triton"):
        t_multi = fastmft.typicality(x, y, k, multi)
        protos = fastmft.class_prototypes(x.double(), y, k, 2, 2)
        t = fastmft.typicality(x.double(), y, k, protos)
    assert_close(t_multi, typicality64(x, y, k, multi.centers, multi.counts, 0.5, multi.temperature), torch.float32)
    assert_close(t, typicality64(x, y, k, protos.centers, protos.counts, 0.5), torch.float32)
