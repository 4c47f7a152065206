"""Triton typicality and prototype sums (interpreter) against float64 formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmft
from fastmft.kernels import _util
from fastmft.ops import triton as triton_ops
from tests.helpers import DEVICE, emulate_tf32_tensor_cores
from tests.helpers import assert_kernel_close as assert_close
from tests.oracles import prototypes64, typicality64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_util, "POISON", True)
    emulate_tf32_tensor_cores(monkeypatch)


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


def _launches(monkeypatch):
    """Names of the kernels launched from now on (interpreter or GPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launcher = InterpretedFunction if _util.interpreter() else JITFunction
    names, real_run = [], launcher.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", run)
    return names


def _typicality_vs_oracle(x, y, k, M, K, alpha=0.5):
    centers, counts = prototypes64(x, y, k, M, K)
    protos = fastmft.Prototypes(centers.float(), counts)
    with fastmft.use_backend("triton"):
        t = fastmft.typicality(x, y, k, protos, alpha=alpha)
    return t, typicality64(x, y, k, protos.centers, counts, alpha)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_outside_the_fast_path(dtype, rng):
    """Zero rows, rows with |x| < 1e-8 or subnormal squares, rows whose squares overflow float32
    (and one whose norm does), next to ordinary rows in the same programs: the exact path gives
    the float64 result; NaN or Inf rows give NaN (the reference's NaN policy), no other row changes."""
    N, D, K, M = 300, 40, 3, 2  # GEMM kernel, BLOCK_N = 128: three programs
    x = torch.randn(N, D, generator=rng)
    x[0] = 0.0
    x[130] = 0.0  # a program whose only odd row is a zero row
    x[5] *= 1e-12  # |x| < 1e-8: the eps of the cosine applies
    if dtype == torch.float16:
        x[7] *= 1e-7  # subnormal float16 values, squares ~1e-14
    else:
        x[7] *= 1e-21  # squares underflow float32
        x[9] *= 1e21  # squares overflow float32
        x[11] = torch.full((D,), 3.0e38)  # even |x| overflows float32
    x = x.to(DEVICE).to(dtype)
    y = torch.randint(0, M, (N,), generator=rng).to(DEVICE)
    k = torch.randint(0, K, (N,), generator=rng).to(DEVICE)
    t, ref = _typicality_vs_oracle(x, y, k, M, K)
    assert torch.isfinite(t).all() and t[0] == 0 and t[130] == 0
    assert_close(t, ref, dtype)
    bad = x.clone()
    bad[20, 3] = float("nan")
    bad[140, 0] = float("inf")
    centers, counts = prototypes64(x, y, k, M, K)  # prototypes of the finite rows
    protos = fastmft.Prototypes(centers.float(), counts)
    with fastmft.use_backend("triton"):
        t_bad = fastmft.typicality(bad, y, k, protos)
    assert torch.isnan(t_bad[[20, 140]]).all()
    keep = torch.ones(N, dtype=torch.bool, device=DEVICE)
    keep[[20, 140]] = False
    assert torch.equal(t_bad[keep], t[keep])


def test_padded_cells_single_domain_and_absent_classes(monkeypatch, rng):
    """K = 1 with one class (1 cell padded to 16 columns); 7 domains x 9 classes (63 cells padded
    to 64) where classes 0..2 exist in domain 0 only: their t is the own cosine."""
    launched = _launches(monkeypatch)
    x = torch.randn(70, 20, generator=rng).to(DEVICE)
    zeros = torch.zeros(70, dtype=torch.int64, device=DEVICE)
    t, _ = _typicality_vs_oracle(x, zeros, zeros, 1, 1)
    assert_close(t, torch.nn.functional.cosine_similarity(x.double(), x.double().mean(0, keepdim=True)), torch.float32)
    N, K, M = 400, 7, 9
    x = torch.randn(N, 33, generator=rng).to(DEVICE)
    y = torch.randint(0, M, (N,), generator=rng).to(DEVICE)
    k = torch.randint(0, K, (N,), generator=rng).to(DEVICE)
    k[y < 3] = 0
    t, ref = _typicality_vs_oracle(x, y, k, M, K, alpha=0.25)
    assert_close(t, ref, torch.float32)
    own = typicality64(x, y, k, *prototypes64(x, y, k, M, K), 1.0)
    assert_close(t[y < 3], own[y < 3], torch.float32)
    assert launched == ["_typicality_kernel", "_typicality_exact_kernel"] * 2


@pytest.mark.parametrize(
    "K, M, kernels",
    [(8, 8, ["_typicality_kernel", "_typicality_exact_kernel"]), (5, 13, ["_typicality_gather_kernel"])],
)
def test_cells_pick_the_kernel(K, M, kernels, monkeypatch, rng):
    """Up to MAX_GEMM_CELLS = 64 cells the GEMM kernel runs (and the exact path's, which finds no
    program listed here), beyond it the gather kernel."""
    launched = _launches(monkeypatch)
    x = torch.randn(150, 24, generator=rng).to(DEVICE)
    y = torch.randint(0, M, (150,), generator=rng).to(DEVICE)
    k = torch.randint(0, K, (150,), generator=rng).to(DEVICE)
    t, ref = _typicality_vs_oracle(x, y, k, M, K)
    assert launched == kernels
    assert_close(t, ref, torch.float32)


def _reversed_grid(monkeypatch):
    """Run the interpreter's programs in reverse order (a GPU schedules them in any order)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx

    def set_grid_idx(x, y, z):
        gx, gy, gz = builder.grid_dim
        real(gx - 1 - x, gy - 1 - y, gz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)


@pytest.mark.skipif(not _util.interpreter(), reason="reorders the interpreter's programs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prototype_sums_do_not_depend_on_program_order(dtype, monkeypatch, rng):
    """Sums of many chunks with magnitudes spread over 2^-e..2^e, so any change in the order of
    the float additions changes bits: run in the interpreter's order and in reverse, the sums are
    bit-identical (float atomics, the previous kernel, failed this), and close to float64."""
    N, D, C = 64 * 40, 20, 6
    e = 20 if dtype == torch.float32 else 8  # float16 stays finite
    scale = torch.exp2(torch.randint(-e, e + 1, (N, 1), generator=rng).float())
    x = (torch.randn(N, D, generator=rng) * scale).to(dtype).to(DEVICE)
    cells = torch.randint(0, C, (N,), generator=rng).to(DEVICE)
    first = triton_ops.prototype_sums(x, cells, C)
    again = triton_ops.prototype_sums(x, cells, C)
    _reversed_grid(monkeypatch)
    reversed_order = triton_ops.prototype_sums(x, cells, C)
    for a, b in ((first, again), (first, reversed_order)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    expected = torch.zeros(C, D, dtype=torch.float64).index_add_(0, cells.cpu(), x.cpu().double())
    tol = 1e-6 * math.sqrt(N) * x.double().abs().max().item()
    torch.testing.assert_close(first[0].cpu().double(), expected, rtol=0, atol=tol)
