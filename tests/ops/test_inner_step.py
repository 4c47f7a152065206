"""fastmft.inner_step and the compiled extension fastmft._C (CPU) against the foreach reference.

The first test that needs the extension builds it just in time (about 15-40 s on 2 cores, once per
source/torch version: later runs load it from the cache).
"""

import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastmft
from fastmft import _C
from fastmft.ops import dispatch, reference
from fastmft.ops.inner_step import NonFiniteError
from tests.helpers import TOLERANCES, assert_flag_contract

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ODD_SIZES = [0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 1000, 4097, 65537]


@pytest.fixture(scope="module")
def compiled():
    if not _C.is_available():
        if os.environ.get("FASTMFT_EXTENSION", "1") == "0":
            pytest.skip("FASTMFT_EXTENSION=0: the compiled extension is disabled")
        pytest.fail(f"fastmft._C did not build on this machine: {_C.status()}")
    return _C


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert torch.equal(bits(a), bits(b)), f"tensor {i} ({tuple(a.shape)} {a.dtype}) differs from the reference"


def assert_matches_reference(got, want, dtype):
    """Bitwise for float32/float64. float16/bfloat16: torch's own scalar tail rounds alpha*grad to the
    dtype before adding (its vector body does not); the kernel computes every element like the
    body (fp32 math, one rounding), so a few tail elements may differ (within the dtype's tolerance)."""
    if dtype in (torch.float32, torch.float64):
        assert_bitwise(got, want)
        return
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)
        # only torch's scalar tail (< 2 vectors of 512 bits per tensor) may differ
        assert int((bits(a) != bits(b)).sum()) <= 64


def emulated(p, g, lr, dtype):
    """fp32 math with one rounding per element, alpha rounded to the dtype (torch's vector body)."""
    a = torch.tensor(-lr, dtype=dtype).double()
    return (p.double() + a * g.double()).float().to(dtype)


def make(sizes, dtype, gen, *, none_every=0):
    ps = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    gs = [torch.randn(n, generator=gen).mul_(5).to(dtype) for n in sizes]
    if none_every:
        gs = [None if i % none_every == 0 else g for i, g in enumerate(gs)]
    return ps, gs


def test_extension_is_built_and_dispatched(compiled, monkeypatch):
    st = compiled.status()
    assert st["cpu"] and st["error"] is None and st["build_info"].startswith("cpu:openmp")
    monkeypatch.delenv("FASTMFT_BACKEND", raising=False)
    assert dispatch.which("inner_step", "cpu") == "compiled"
    with fastmft.use_backend("torch"):
        assert dispatch.which("inner_step", "cpu") == "torch"
    monkeypatch.setenv("FASTMFT_BACKEND", "torch")
    assert dispatch.which("inner_step", "cpu") == "torch"
    monkeypatch.setenv("FASTMFT_BACKEND", "auto")
    assert dispatch.which("inner_step", "cpu") == "compiled"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_kind", ["none", "flat", "list"])
def test_matches_reference(compiled, dtype, out_kind, rng):
    ps, gs = make(ODD_SIZES, dtype, rng, none_every=4)
    lr = 0.01234567
    want = reference.inner_step(ps, gs, lr, None)
    if out_kind == "none":
        got = fastmft.inner_step(ps, gs, lr)
        for i, g in enumerate(gs):  # a None grad returns the parameter itself, detached, not copied
            if g is None:
                assert got[i].data_ptr() == ps[i].data_ptr() or ps[i].numel() == 0
    elif out_kind == "flat":
        flat = fastmft.FlatParams(ps, copy=False)
        got = fastmft.inner_step(ps, gs, lr, out=flat)
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(got, flat.views))
    else:
        outs = [torch.full_like(p, 7.0) for p in ps]
        got = fastmft.inner_step(ps, gs, lr, out=outs)
        assert all(a is b for a, b in zip(got, outs))
    assert_matches_reference(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_is_fp32_math_one_rounding(compiled, dtype, rng):
    ps, gs = make(ODD_SIZES, dtype, rng)
    lr = 0.01234567
    got = fastmft.inner_step(ps, gs, lr)
    assert_bitwise(got, [emulated(p, g, lr, dtype) for p, g in zip(ps, gs)])
    want = reference.inner_step(ps, gs, lr, None)
    for a, b in zip(got, want):
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def test_non_contiguous(compiled, rng):
    base = torch.randn(64, 48, generator=rng)
    ps = [
        base.t(),
        base[::2, 1:],
        torch.randn(5, 7, generator=rng),
        torch.randn(3, 4, 5, generator=rng).permute(2, 0, 1),
    ]
    gs = [torch.randn(p.shape, generator=rng) for p in ps]
    gs[2] = torch.randn(7, 5, generator=rng).t()  # a non-contiguous grad of a contiguous param
    lr = 0.3
    want = reference.inner_step(ps, gs, lr, None)
    assert_bitwise(fastmft.inner_step(ps, gs, lr), want)
    flat = fastmft.FlatParams(ps)
    assert_bitwise(fastmft.inner_step(ps, gs, lr, out=flat), want)
    outs = [torch.empty(p.shape[::-1]).transpose(0, -1) if p.dim() == 2 else torch.empty_like(p) for p in ps]
    assert_bitwise(fastmft.inner_step(ps, gs, lr, out=outs), want)


def test_many_tiny_and_a_few_huge(compiled, rng):
    sizes = [int(n) for n in torch.randint(0, 40, (3000,), generator=rng)] + [1_500_001, 1_048_576, 2_000_003]
    ps, gs = make(sizes, torch.float32, rng, none_every=7)
    lr = 2e-3
    want = reference.inner_step(ps, gs, lr, None)
    flat = fastmft.FlatParams(ps, copy=False)
    assert_bitwise(fastmft.inner_step(ps, gs, lr, out=flat), want)


def test_mixed_dtypes_one_call(compiled, rng):
    ps, gs = [], []
    for i, dtype in enumerate(DTYPES * 3):
        p, g = make([100 + 37 * i], dtype, rng)
        ps += p
        gs += g
    lr = 0.05
    want = reference.inner_step(ps, gs, lr, None)
    flat = fastmft.FlatParams(ps, copy=False)
    assert len(flat.buffers) == 4
    got = fastmft.inner_step(ps, gs, lr, out=flat)
    for dtype in DTYPES:
        idx = [i for i, p in enumerate(ps) if p.dtype == dtype]
        assert_matches_reference([got[i] for i in idx], [want[i] for i in idx], dtype)


def test_in_place_and_params_with_grad(compiled, rng):
    ps = [torch.randn(n, generator=rng, requires_grad=True) for n in (10, 1000, 70001)]
    gs = [torch.randn(p.shape, generator=rng) for p in ps]
    want = reference.inner_step(ps, gs, 0.1, None)
    got = fastmft.inner_step(ps, gs, 0.1)
    assert all(not t.requires_grad for t in got)
    assert_bitwise(got, want)
    copies = [p.detach().clone() for p in ps]
    fastmft.inner_step(copies, gs, 0.1, out=copies)  # out aliases params: an in-place step
    assert_bitwise(copies, want)


def test_lr_as_tensor_and_zero(compiled, rng):
    ps, gs = make([33, 1000], torch.float32, rng)
    assert_bitwise(fastmft.inner_step(ps, gs, torch.tensor(0.25)), reference.inner_step(ps, gs, 0.25, None))
    assert_bitwise(fastmft.inner_step(ps, gs, 0.0), reference.inner_step(ps, gs, 0.0, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_check_finite(compiled, dtype, impl, rng):
    ps, gs = make([5, 4097, 100_000], dtype, rng)
    gs[2][12345] = float("inf")
    flat = fastmft.FlatParams(ps, copy=False)
    with fastmft.use_backend(impl):
        fastmft.inner_step(ps, gs, 0.1, out=flat)  # no check: inf written, no error
        assert torch.isinf(flat[2][12345])
        with pytest.raises(NonFiniteError):
            fastmft.inner_step(ps, gs, 0.1, out=flat, check_finite=True)
        with pytest.raises(FloatingPointError):
            fastmft.inner_step(ps, gs, 0.1, check_finite=True)
        gs[2][12345] = 0.0
        fastmft.inner_step(ps, gs, 0.1, out=flat, check_finite=True)
        ps[0][1] = float("nan")
        for where in (flat, None):  # a NaN in theta with a None grad is reported too, with or without out
            with pytest.raises(NonFiniteError):
                fastmft.inner_step(ps, [None, gs[1], gs[2]], 0.1, out=where, check_finite=True)


def test_op_flag_is_a_0d_bool_tensor(compiled):
    assert_flag_contract(torch.device("cpu"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_repeated_calls_do_not_grow_memory(compiled, rng):
    ps, gs = make([1_000_000, 500_000, 123, 45_678], torch.float32, rng)
    flat = fastmft.FlatParams(ps, copy=False)
    ptrs = [b.data_ptr() for b in flat.buffers.values()]
    for _ in range(5):
        fastmft.inner_step(ps, gs, 0.1, out=flat)
    before = _rss_bytes()
    for _ in range(60):
        fastmft.inner_step(ps, gs, 0.1, out=flat)
    grown = _rss_bytes() - before
    assert [b.data_ptr() for b in flat.buffers.values()] == ptrs
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 60 calls"


def test_validation_errors():
    p = torch.randn(3)
    with pytest.raises(ValueError):
        fastmft.inner_step([p], [torch.randn(4)], 0.1)
    with pytest.raises(ValueError):
        fastmft.inner_step([p], [], 0.1)
    with pytest.raises(ValueError):
        fastmft.inner_step([p], [torch.randn(3)], 0.1, out=[torch.empty(3, dtype=torch.float64)])
    assert fastmft.inner_step([], [], 0.1) == []


def test_failed_build_warns_once_and_falls_back(compiled, monkeypatch, rng):
    """A build failure (simulated: sources missing) warns once; the reference runs instead."""
    saved_state, saved_warned = dict(_C._state), _C._warned
    try:
        _C._state.update(tried=False, cpu=False, cuda=False, error=None, path=None)
        _C._warned = False
        monkeypatch.setattr(_C, "sources_dir", lambda: None)
        # pretend the op is not registered in this process yet
        monkeypatch.setattr(_C, "_registered", lambda: False)
        ps, gs = make([100, 3], torch.float32, rng)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got1 = fastmft.inner_step(ps, gs, 0.1)
            got2 = fastmft.inner_step(ps, gs, 0.1)
        msgs = [str(w.message) for w in caught if "fastmft._C" in str(w.message)]
        assert len(msgs) == 1 and "foreach" in msgs[0]
        assert dispatch.which("inner_step", "cpu") == "torch"
        assert_bitwise(got1, reference.inner_step(ps, gs, 0.1, None))
        assert_bitwise(got2, got1)
        assert not _C.is_available() and _C.status()["error"]
    finally:
        _C._state.clear()
        _C._state.update(saved_state)
        _C._warned = saved_warned


def test_cuda_source_compiles_for_sm90(tmp_path):
    """csrc/inner_step_cuda.cu through nvcc for an H100, compile only (a CPU-only torch cannot link
    it; tests/ops/test_inner_step_cuda.py runs it on a GPU), so that a GPU session does not meet its
    first compile error. The CPU wheel lacks the CUDA build's generated
    c10/cuda/impl/cuda_cmake_macros.h: an empty stand-in, searched after torch's own headers.
    ptxas's report (--resource-usage) must show no stack frame and no spill in any kernel: the
    tensor-list metadata passed by value is read from the constant bank, not copied to local memory;
    and the float32 kernels fit 4 CTAs of 512 threads per SM (<= 32 registers), the occupancy the
    chunk size is chosen for (csrc/inner_step_cuda.cu)."""
    import shutil

    from torch.utils.cpp_extension import include_paths

    home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)
    if nvcc is None or not os.path.exists(nvcc):
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    stub = tmp_path / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    obj = tmp_path / "inner_step_cuda.o"
    cmd = [
        nvcc,
        "-c",
        *_C.CUDA_FLAGS,
        "-arch=sm_90",
        "--resource-usage",
        *[f"-I{p}" for p in include_paths()],
        f"-I{stub}",
        str(_C.sources_dir() / "inner_step_cuda.cu"),
        "-o",
        str(obj),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert obj.stat().st_size > 0
    report = r.stdout + r.stderr
    blocks = dict(
        re.findall(r"Compiling entry function '(\S+)' for 'sm_90'\n(.*?)(?=Compiling entry function|\Z)", report, re.S)
    )
    kernels = {name: text for name, text in blocks.items() if "inner_step_kernel" in name}
    assert len(kernels) == 16, report[-4000:]  # 4 dtypes x fma x check
    for name, text in kernels.items():
        usage = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert usage and usage.groups() == ("0", "0", "0"), (name, text)
    registers = {name: int(re.search(r"Used (\d+) registers", text).group(1)) for name, text in kernels.items()}
    float32 = [n for name, n in registers.items() if "inner_step_kernelIf" in name]
    assert len(float32) == 4 and max(float32) <= 32, registers


def _run(code: str, **env) -> str:
    full_env = {**os.environ, **env}
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_disabled_extension_uses_foreach_without_warning(compiled):
    out = _run(
        """
        import warnings; warnings.simplefilter("error")
        import torch, fastmft
        from fastmft import _C
        from fastmft.ops import dispatch
        ps = [torch.randn(10)]; gs = [torch.randn(10)]
        print(dispatch.which("inner_step", "cpu"), _C.is_available(), fastmft.inner_step(ps, gs, 0.1)[0].shape)
        """,
        FASTMFT_EXTENSION="0",
    )
    assert out.split() == ["torch", "False", "torch.Size([10])"]


def test_missing_compiler_warns_once_and_falls_back(compiled, tmp_path):
    """A real failed build (no compiler, empty cache): one warning, the foreach reference runs."""
    out = _run(
        """
        import warnings
        import torch, fastmft
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fastmft.inner_step([torch.ones(3)], [torch.ones(3)], 0.5)[0]
            b = fastmft.inner_step([torch.ones(3)], [torch.ones(3)], 0.5)[0]
        n = sum("fastmft._C could not be built" in str(w.message) for w in caught)
        print(n, fastmft.ops.dispatch.which("inner_step", "cpu"), a.tolist() == b.tolist() == [0.5, 0.5, 0.5])
        """,
        CXX=str(tmp_path / "no-such-compiler"),
        FASTMFT_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert out.split() == ["1", "torch", "True"]


@pytest.mark.parametrize(
    "env",
    [
        # torch's DEFAULT kernels multiply then add (no FMA): the probe must notice and follow
        {"ATEN_CPU_CAPABILITY": "default"},
        # the streaming-store path (normally only for outputs over 4 x the last-level cache)
        {"FASTMFT_STREAM_STORES": "1"},
    ],
    ids=["default-capability", "stream-stores"],
)
def test_bitwise_in_other_modes(compiled, env):
    out = _run(
        """
        import torch, fastmft
        from fastmft.ops import reference
        from fastmft.ops.inner_step import NonFiniteError
        g = torch.Generator().manual_seed(0)
        sizes = (1, 17, 4097, 100003, 7, 262147)
        base_p, base_g = torch.randn(sum(sizes) + 1, generator=g), torch.randn(sum(sizes) + 1, generator=g)
        ps, gs, o = [], [], 1  # views at odd offsets: unaligned starts
        for n in sizes:
            ps.append(base_p[o:o + n]); gs.append(base_g[o:o + n]); o += n
        want = reference.inner_step(ps, gs, 0.0123, None)
        outs = [torch.empty(sum(sizes) + 3)[3 + sum(sizes[:i]):3 + sum(sizes[:i + 1])] for i in range(len(sizes))]
        got = fastmft.inner_step(ps, gs, 0.0123, out=outs)
        same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want))
        gs[5][200000] = float("inf")
        try:
            fastmft.inner_step(ps, gs, 0.0123, out=outs, check_finite=True)
            flagged = False
        except NonFiniteError:
            flagged = True
        # bfloat16 (its own streaming path): fp32 math, one rounding, alpha rounded to bf16
        bp, bg = [p.to(torch.bfloat16) for p in ps], [x.to(torch.bfloat16) for x in gs]
        bg[5][200000] = 0.5
        mode = fastmft._C.modes_for(torch.device("cpu"))[3]  # what the probe of torch chose
        a = torch.tensor(-0.0123, dtype=torch.bfloat16 if mode & 2 else torch.float32).double()
        if mode & 1:  # one fused multiply-add in fp32 (exact in float64, then rounded)
            want_b = [(p.double() + a * x.double()).float().to(torch.bfloat16) for p, x in zip(bp, bg)]
        else:         # multiply, round to fp32, add, round
            want_b = [(p.float() + (a * x.double()).float()).to(torch.bfloat16) for p, x in zip(bp, bg)]
        outs_b = [torch.empty(sum(sizes) + 5, dtype=torch.bfloat16)[5 + sum(sizes[:i]):5 + sum(sizes[:i + 1])] for i in range(len(sizes))]
        got_b = fastmft.inner_step(bp, bg, 0.0123, out=outs_b)
        same_b = all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(got_b, want_b))
        bg[5][200000] = float("inf")
        try:
            fastmft.inner_step(bp, bg, 0.0123, out=outs_b, check_finite=True)
            flagged_b = False
        except NonFiniteError:
            flagged_b = True
        print(fastmft.ops.dispatch.which("inner_step", "cpu"), same, flagged, same_b, flagged_b)
        """,
        **env,
    )
    assert out.split() == ["compiled", "True", "True", "True", "True"]


def test_tensors_on_several_devices_fall_back_to_the_reference(compiled):
    ps = [torch.ones(3), torch.ones(3, device="meta")]
    gs = [torch.ones(3), torch.ones(3, device="meta")]
    reason = dispatch.fallback_reason("inner_step", "compiled", ps, gs, 0.5, None, False)
    assert reason == "parameters on several devices"
    got = fastmft.inner_step(ps, gs, 0.5)
    assert got[0].tolist() == [0.5, 0.5, 0.5] and got[1].device.type == "meta"


def test_build_folder_depends_on_the_source_folder(tmp_path, monkeypatch):
    """Two checkouts must not share a build folder (build.ninja holds absolute source paths)."""
    import shutil

    from fastmft import _C

    class Stop(Exception):
        pass

    names = []

    def stop_before_loading(name, sources, cflags, with_cuda, build_dir):
        names.append(build_dir.name)
        raise Stop

    monkeypatch.setattr(_C, "_load_locked", stop_before_loading)
    for copy in ("a", "b"):
        src = tmp_path / copy / "csrc"
        shutil.copytree(_C.sources_dir(), src)
        monkeypatch.setattr(_C, "sources_dir", lambda src=src: src)
        monkeypatch.setattr(_C, "cache_dir", lambda: tmp_path / "cache")
        with pytest.raises(Stop):
            _C._build(False)
    assert len(names) == 2 and names[0] != names[1]


def test_flat_params_from_module_names_copies_and_functional_call():
    """from_module holds a copy of every named parameter (one buffer per dtype) under its name;
    functional_call over as_dict() computes what the module computes, and a step on the flat
    copy leaves the module's own parameters alone."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    flat = fastmft.FlatParams.from_module(module)
    named = dict(module.named_parameters())
    assert list(flat.as_dict()) == list(named) and len(flat.buffers) == 1
    for name, view in flat.as_dict().items():
        assert torch.equal(view, named[name]) and view.data_ptr() != named[name].data_ptr()
    x = torch.randn(3, 5, dtype=torch.float64)
    want = module.double()(x)
    flat = fastmft.FlatParams.from_module(module)
    got = torch.func.functional_call(module, flat.as_dict(), (x,))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    before = [p.detach().clone() for p in module.parameters()]
    grads = [torch.ones_like(p) for p in module.parameters()]
    fastmft.inner_step(list(module.parameters()), grads, lr=0.5, out=flat)
    for p, b, view in zip(module.parameters(), before, flat):
        assert torch.equal(p.detach(), b)
        torch.testing.assert_close(view, b - 0.5, rtol=0, atol=1e-15)
