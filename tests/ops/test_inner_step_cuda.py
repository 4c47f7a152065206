"""The CUDA part of fastmft._C (csrc/inner_step_cuda.cu): multi-tensor-apply inner step.

Skipped, with the reason, where torch has no CUDA device: the CUDA sources are built only against
a CUDA build of torch (a CPU-only torch cannot link them).
"""

import pytest
import torch

import fastmft
from fastmft import _C
from fastmft.ops import dispatch, reference
from fastmft.ops.inner_step import NonFiniteError
from tests.helpers import TOLERANCES, assert_flag_contract

if torch.version.cuda is None:
    pytest.skip(
        f"torch {torch.__version__} is a CPU-only build: the CUDA kernel of fastmft._C is not built",
        allow_module_level=True,
    )
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA kernel of fastmft._C cannot run here", allow_module_level=True)

DEV = torch.device("cuda")
SIZES = [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 4097, 65535, 65536, 65537, 1_000_003]


@pytest.fixture(scope="module")
def compiled():
    if not _C.is_available(DEV):
        pytest.fail(f"fastmft._C has no CUDA part on this CUDA machine: {_C.status()}")
    return _C


def bits(t):
    t = t.contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def make(sizes, dtype, seed=0, none_every=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    ps = [torch.randn(n, generator=g, device=DEV).to(dtype) for n in sizes]
    gs = [torch.randn(n, generator=g, device=DEV).mul_(5).to(dtype) for n in sizes]
    if none_every:
        gs = [None if i % none_every == 0 else x for i, x in enumerate(gs)]
    return ps, gs


def test_dispatch(compiled):
    assert dispatch.which("inner_step", DEV) == "compiled"
    with fastmft.use_backend("torch"):
        assert dispatch.which("inner_step", DEV) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_out", [False, True])
def test_matches_reference(compiled, dtype, use_out):
    ps, gs = make(SIZES, dtype, none_every=5)
    lr = 0.01234567
    want = reference.inner_step(ps, gs, lr, None)
    if use_out:
        flat = fastmft.FlatParams(ps, copy=False)
        got = fastmft.inner_step(ps, gs, lr, out=flat)
    else:
        got = fastmft.inner_step(ps, gs, lr)
    exact = _C.is_exact(dtype, DEV)
    for a, b in zip(got, want):
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(bits(a), bits(b))
        else:
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)
            if exact:
                assert torch.equal(bits(a), bits(b))


def test_unaligned_views_and_non_contiguous(compiled):
    flat = torch.randn(10_001, device=DEV)
    ps = [flat[1:4001], flat[4001 : 4001 + 77], flat[5000:9000].view(40, 100).t()]
    gs = [torch.randn(p.shape, device=DEV) for p in ps]
    want = reference.inner_step(ps, gs, 0.1, None)
    out_buf = torch.empty(10_003, device=DEV)
    outs = [out_buf[3:4003], out_buf[4003:4080], torch.empty(40, 100, device=DEV).t()]
    got = fastmft.inner_step(ps, gs, 0.1, out=outs)
    for a, b in zip(got, want):
        assert torch.equal(bits(a), bits(b))


def test_many_tiny_tensors(compiled):
    sizes = [int(n) for n in torch.randint(0, 40, (5000,), generator=torch.Generator().manual_seed(1))]
    ps, gs = make(sizes, torch.float32, none_every=9)
    want = reference.inner_step(ps, gs, 0.2, None)
    got = fastmft.inner_step(ps, gs, 0.2, out=fastmft.FlatParams(ps, copy=False))
    for a, b in zip(got, want):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_finite(compiled, dtype):
    ps, gs = make([5, 4097, 100_000], dtype)
    gs[2][12345] = float("inf")
    flat = fastmft.FlatParams(ps, copy=False)
    with pytest.raises(NonFiniteError):
        fastmft.inner_step(ps, gs, 0.1, out=flat, check_finite=True)
    gs[2][12345] = 0.0
    fastmft.inner_step(ps, gs, 0.1, out=flat, check_finite=True)


def test_op_flag_is_a_0d_bool_tensor(compiled):
    assert_flag_contract(DEV)


def test_memory_flat(compiled):
    ps, gs = make([1_000_000, 333, 500_000], torch.float32)
    flat = fastmft.FlatParams(ps, copy=False)
    fastmft.inner_step(ps, gs, 0.1, out=flat)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(50):
        fastmft.inner_step(ps, gs, 0.1, out=flat)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20


def test_cuda_graph_replays_with_new_values(compiled):
    """The tensor-list metadata travels in the kernel's arguments, so a captured inner step replays
    with the pointers it was captured with, whatever runs between replays. 260 tensors, float32 and
    bfloat16 mixed, some without a gradient: several launches per dtype (at most 110 tensors each).
    Between replays an eager inner step on another list runs (the previous version copied its
    metadata from a recycled pinned host buffer, which such a call overwrites). Checked against a
    float64 reference computed from the formula. Runs only where CUDA exists."""
    gen = torch.Generator(device=DEV).manual_seed(7)
    sizes = [1 + int(n) for n in torch.randint(0, 40_000, (260,), generator=torch.Generator().manual_seed(3))]
    dtypes = [torch.float32 if i % 3 else torch.bfloat16 for i in range(len(sizes))]
    ps = [torch.empty(n, device=DEV, dtype=dt) for n, dt in zip(sizes, dtypes)]
    gs = [None if i % 17 == 0 else torch.empty(n, device=DEV, dtype=dt) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
    outs = fastmft.FlatParams(ps, copy=False)
    other_p = [torch.randn(n, device=DEV) for n in sizes[:50]]
    other_g = [torch.randn(n, device=DEV) for n in sizes[:50]]
    other_out = [torch.zeros(n, device=DEV) for n in sizes[:50]]
    lr = 0.05

    def refill():
        for p, g in zip(ps, gs):
            p.copy_(torch.randn(p.shape, generator=gen, device=DEV))
            if g is not None:
                g.copy_(torch.randn(g.shape, generator=gen, device=DEV) * 5)
        for o in outs:
            o.fill_(float("nan"))

    refill()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds the extension and probes torch's rounding once
        fastmft.inner_step(ps, gs, lr, out=outs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fastmft.inner_step(ps, gs, lr, out=outs)
    for _ in range(3):
        refill()
        fastmft.inner_step(other_p, other_g, 0.5, out=other_out)  # eager, another list, between replays
        graph.replay()
        torch.cuda.synchronize()
        for p, g, o in zip(ps, gs, outs):
            want = p.double() if g is None else p.double() - lr * g.double()
            rtol, atol = TOLERANCES[p.dtype]
            torch.testing.assert_close(o.double(), want, rtol=rtol, atol=atol)
        for p, g, o in zip(other_p, other_g, other_out):
            torch.testing.assert_close(o.double(), p.double() - 0.5 * g.double(), rtol=1e-6, atol=1e-6)
