"""What the GPU runs, executed here: every tile configuration a GPU can pick, 64-bit offsets of
strided views over large storage, launches on the tensors' device, the accumulator's dispatch
device, and the host reads an MFT step makes. Each compares with the float64 oracles."""

import warnings

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import fastmft
from fastmft.kernels import _util, cross_entropy, pooling
from fastmft.kernels import typicality as kt
from fastmft.ops import _checks
from tests.helpers import DEVICE
from tests.helpers import assert_kernel_close as assert_close
from tests.oracles import mhce64, pool64, prototypes64, typicality64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The class whose .run every launch goes through: the interpreter's on CPU, the JIT's on a GPU.
LAUNCHER = InterpretedFunction if _util.interpreter() else JITFunction


def _record_launches(monkeypatch, record):
    real_run = LAUNCHER.run

    def run(self, *args, **kwargs):
        record(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(LAUNCHER, "run", run)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_util, "POISON", True)


def _randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEVICE).to(dtype)


# --- every tile configuration of every kernel, on small shapes --------------------------------


@pytest.mark.parametrize("cfg", pooling.all_tiles(), ids=str)
def test_pool_every_tile(cfg, rng):
    T, D = cfg["BLOCK_T"], cfg["BLOCK_D"]  # the smallest shape that picks this tile
    assert pooling.tile(T, D) == cfg
    for dtype in DTYPES:
        layers = [_randn(3, T, D, g=rng, dtype=dtype).requires_grad_() for _ in range(2)]
        mask = (torch.rand(3, T, generator=rng) > 0.3).to(DEVICE)
        with fastmft.use_backend("triton"):
            out = fastmft.masked_mean_pool(layers, mask, skip_cls=True)
        ref_layers = [h.detach().double().requires_grad_() for h in layers]
        ref = pool64(ref_layers, mask, True)
        assert_close(out, ref, dtype)
        grad = _randn(*out.shape, g=rng)
        out.backward(grad.to(out.dtype))
        ref.backward(grad.to(out.dtype).double())
        for h, r in zip(layers, ref_layers):
            assert_close(h.grad, r.grad, dtype)


# K * M cells that pick each CELLS of the GEMM kernel, padded (not a power of two)
GEMM_DOMAINS_CLASSES = {16: (3, 5), 32: (5, 6), 64: (7, 9)}


@pytest.mark.parametrize("cfg", kt.gemm_tiles(), ids=str)
def test_typicality_every_tile(cfg, rng):
    cfg = dict(cfg)
    tile_dtype, D = cfg.pop("dtype"), cfg.pop("D")  # D = BLOCK_D, or odd (a column mask)
    K, M = GEMM_DOMAINS_CLASSES[cfg["CELLS"]]
    N = 2 * cfg["BLOCK_N"] + 3  # several programs, a ragged last one
    # the element size picks the tile: float32 alone, or both 16-bit dtypes
    for dtype in [torch.float32] if tile_dtype == torch.float32 else [torch.float16, torch.bfloat16]:
        assert kt.gemm_tile(D, K * M, dtype) == cfg
        _check_typicality(N, D, K, M, dtype, rng)


@pytest.mark.parametrize("cfg", kt.gather_tiles(), ids=str)
def test_typicality_gather_every_tile(cfg, rng):
    D, K = cfg["BLOCK_D"], cfg["BLOCK_K"]
    M = kt.MAX_GEMM_CELLS // K + 1  # more cells than the GEMM kernel takes
    assert kt.gather_tile(D, K) == cfg
    for dtype in DTYPES:
        _check_typicality(2 * cfg["BLOCK_N"] + 3, D, K, M, dtype, rng)


def _check_typicality(N, D, K, M, dtype, rng):
    x = _randn(N, D, g=rng, dtype=dtype)
    y = torch.randint(0, M, (N,), generator=rng).to(DEVICE)
    k = torch.randint(0, K, (N,), generator=rng).to(DEVICE)
    centers, counts = prototypes64(x, y, k, M, K)
    protos = fastmft.Prototypes(centers.float(), counts)
    with fastmft.use_backend("triton"):
        t = fastmft.typicality(x, y, k, protos, alpha=0.3)
    assert_close(t, typicality64(x, y, k, protos.centers, counts, 0.3), dtype)


@pytest.mark.parametrize("cfg", kt.sums_tiles(), ids=str)
def test_prototype_sums_every_tile(cfg, rng):
    D, C = cfg["BLOCK_D"], cfg["BLOCK_C"]
    # The interpreter's tl.dot is wrong for bfloat16 operands, so there the tensor-core path runs
    # in float16 only; on a GPU (benchmarks/gpu_session.sh) in bfloat16 too.
    native = [torch.float16] + ([] if _util.interpreter() else [torch.bfloat16])
    dtypes = native if cfg["NATIVE_DOT"] else [torch.float32]
    M = 2 if C > 16 else 1
    K = C // M
    for dtype in dtypes:
        assert kt.sums_tile(D, C, dtype) == cfg
        N = 3 * cfg["BLOCK_N"] + 5
        x = _randn(N, D, g=rng, dtype=dtype)
        y = torch.randint(0, M, (N,), generator=rng).to(DEVICE)
        k = torch.randint(0, K, (N,), generator=rng).to(DEVICE)
        with fastmft.use_backend("triton"):
            protos = fastmft.class_prototypes(x, y, k, M, K)
        centers, counts = prototypes64(x, y, k, M, K)
        assert torch.equal(protos.counts, counts)
        assert_close(protos.centers, centers, torch.float32)  # exact sums of 16-bit values


@pytest.mark.parametrize("cfg", cross_entropy.all_tiles(), ids=str)
def test_cross_entropy_every_tile(cfg, rng, monkeypatch):
    classes = (cfg["BLOCK_C"][0], 3, 2)  # all_tiles: the first head sets the configuration
    assert cross_entropy.tile(classes) == cfg
    # Two programs over five blocks and a ragged last one: the persistent loop runs 3 and 2 times.
    monkeypatch.setattr(cross_entropy, "programs", lambda device, num_blocks: 2)
    N = 4 * cfg["BLOCK_N"] + 1
    for dtype in DTYPES:
        logits = [_randn(N, c, g=rng, dtype=dtype).requires_grad_() for c in classes]
        targets = [torch.randint(0, c, (N,), generator=rng).to(DEVICE) for c in classes]
        targets[1][::3] = -100
        w = torch.rand(N, generator=rng).to(DEVICE).requires_grad_()
        with fastmft.use_backend("triton"):
            loss = fastmft.multi_head_cross_entropy(logits, targets, sample_weight=w, head_weight=[1.0, 0.5, 2.0])
        ref_logits = [x.detach().double().requires_grad_() for x in logits]
        ref_w = w.detach().double().requires_grad_()
        ref = mhce64(ref_logits, targets, ref_w, [1.0, 0.5, 2.0])
        assert_close(loss, ref, dtype)
        loss.backward()
        ref.backward()
        for x, r in zip(logits, ref_logits):
            assert_close(x.grad, r.grad, dtype)
        assert_close(w.grad, ref_w.grad, dtype)


def test_cross_entropy_eight_heads_and_97_classes(rng):
    classes = (97, 3, 4, 4, 4, 4, 4, 4)
    N = 40
    logits = [_randn(N, c, g=rng).requires_grad_() for c in classes]
    targets = [torch.randint(0, c, (N,), generator=rng).to(DEVICE) for c in classes]
    with fastmft.use_backend("triton"):
        loss = fastmft.multi_head_cross_entropy(logits, targets)
    ref_logits = [x.detach().double().requires_grad_() for x in logits]
    ref = mhce64(ref_logits, targets)
    loss.backward()
    ref.backward()
    assert_close(loss, ref, torch.float32)
    for x, r in zip(logits, ref_logits):
        assert_close(x.grad, r.grad, torch.float32)


# --- 64-bit offsets: a [16, 768] view with stride(1) = 2**22 reaches element 3.2e9 ----------------

BIG_STRIDE = 2**22


def _huge_strided(g, rows=16, cols=768):
    """A [rows, cols] float32 view whose column stride is 2**22 over ~13 GB of storage that is
    never touched except at the view's own elements (a few MB of pages)."""
    storage = torch.empty(rows + (cols - 1) * BIG_STRIDE, device=DEVICE)
    view = torch.as_strided(storage, (rows, cols), (1, BIG_STRIDE))
    view.copy_(torch.randn(rows, cols, generator=g))
    return view


def test_typicality_and_sums_large_strides(rng):
    x = _huge_strided(rng)
    y = torch.randint(0, 2, (16,), generator=rng).to(DEVICE)
    k = torch.randint(0, 3, (16,), generator=rng).to(DEVICE)
    with fastmft.use_backend("triton"):
        protos = fastmft.class_prototypes(x, y, k, 2, 3)
        t = fastmft.typicality(x, y, k, protos)
    centers, counts = prototypes64(x, y, k, 2, 3)
    assert_close(protos.centers, centers, torch.float32)
    assert_close(t, typicality64(x, y, k, protos.centers, counts, 0.5), torch.float32)


def test_pool_large_strides(rng):
    h = torch.as_strided(_huge_strided(rng), (2, 8, 768), (8, 1, BIG_STRIDE))
    mask = (torch.rand(2, 8, generator=rng) > 0.3).to(DEVICE)
    with fastmft.use_backend("triton"):
        out = fastmft.masked_mean_pool([h], mask)
    assert_close(out, pool64([h], mask, False), torch.float32)


def test_cross_entropy_large_strides(rng):
    x = _huge_strided(rng).requires_grad_()  # 768 classes, class stride 2**22
    y = torch.randint(0, 768, (16,), generator=rng).to(DEVICE)
    with fastmft.use_backend("triton"):
        loss = fastmft.multi_head_cross_entropy([x], [y])
    loss.backward()
    xr = x.detach().double().requires_grad_()
    ref = mhce64([xr], [y])
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(x.grad, xr.grad, torch.float32)


# --- typicality of rows whose squares overflow float32 ----------------------------------------


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_typicality_huge_rows(backend_name, rng):
    x = _randn(40, 24, g=rng)
    x[::3] *= 1e21  # |x|^2 ~ 1e43: inf in float32
    y = torch.randint(0, 2, (40,), generator=rng).to(DEVICE)
    k = torch.randint(0, 3, (40,), generator=rng).to(DEVICE)
    centers, counts = prototypes64(x / x.norm(dim=1, keepdim=True), y, k, 2, 3)
    protos = fastmft.Prototypes(centers.float(), counts)
    with fastmft.use_backend(backend_name):
        t = fastmft.typicality(x, y, k, protos)
    assert torch.isfinite(t).all()
    assert_close(t, typicality64(x, y, k, protos.centers, counts, 0.5), torch.float32)


# --- launches on the tensors' device ----------------------------------------------------------


def test_every_launch_is_guarded_by_the_tensors_device(monkeypatch, rng):
    """Triton launches on the *current* CUDA device: each launch must sit inside
    _util.on_device(tensors' device). Checked for every kernel through the public ops."""
    depth, launches, guarded = [0], [], []
    real_on_device = _util.on_device

    class Guard:
        def __init__(self, device):
            self.inner = real_on_device(device)
            guarded.append(device)

        def __enter__(self):
            depth[0] += 1
            return self.inner.__enter__()

        def __exit__(self, *exc):
            depth[0] -= 1
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(_util, "on_device", Guard)
    _record_launches(monkeypatch, lambda name: launches.append((name, depth[0])))
    x = _randn(8, 2, 16, g=rng).requires_grad_()
    mask = torch.ones(8, 2, dtype=torch.bool, device=DEVICE)
    y = torch.randint(0, 2, (8,), generator=rng).to(DEVICE)
    with fastmft.use_backend("triton"):
        e = fastmft.masked_mean_pool(x, mask)
        protos = fastmft.class_prototypes(e.detach(), y, y, 2, 2)
        fastmft.typicality(e.detach(), y, y, protos)
        fastmft.multi_head_cross_entropy([e], [y]).backward()
    names = {name for name, _ in launches}
    assert names == {
        "_pool_fwd_kernel",
        "_pool_bwd_kernel",
        "_prototype_sums_kernel",
        "_typicality_kernel",
        "_typicality_exact_kernel",
        "_mhce_fwd_kernel",
        "_mhce_bwd_kernel",
    }
    assert all(d > 0 for _, d in launches), [n for n, d in launches if d == 0]
    assert all(dev == x.device for dev in guarded)


def test_accumulator_sums_on_the_embeddings_device(monkeypatch, rng):
    """The accumulator may live elsewhere (default CPU): the implementation chosen for the
    embeddings' device must get tensors on that device, and only the [C, D] sums move."""
    from fastmft.ops import dispatch

    seen = []
    real_resolve = dispatch.resolve

    def resolve(op, device):
        impl = real_resolve(op, device)

        def spy(*args):
            seen.append((device, {a.device for a in args if isinstance(a, torch.Tensor)}))
            return impl(*args)

        return spy

    monkeypatch.setattr(dispatch, "resolve", resolve)
    acc = fastmft.PrototypeAccumulator(num_labels=2, num_domains=2, dim=4, device="meta")
    e = _randn(6, 4, g=rng)
    y = torch.randint(0, 2, (6,), generator=rng).to(DEVICE)
    acc.update(e, y, y)
    assert seen == [(e.device, {e.device})]
    assert acc.sums.device.type == "meta"


# --- host reads of one MFT step ---------------------------------------------------------------


def test_mft_loss_forward_reads_the_host_once(monkeypatch, rng):
    reads = []
    real_read = _checks._host_read
    monkeypatch.setattr(_checks, "_host_read", lambda v: reads.append(v.numel()) or real_read(v))
    B, T, D = 6, 5, 8
    hidden = tuple(_randn(B, T, D, g=rng).requires_grad_() for _ in range(4))
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    labels = torch.randint(0, 2, (B,), generator=rng).to(DEVICE)
    domains = torch.randint(0, 3, (B,), generator=rng).to(DEVICE)
    mft = fastmft.MFTLoss(D, 2, 3, layers=(1, 2, 3)).to(DEVICE)
    t = torch.rand(B, generator=rng).to(DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mft(hidden, mask, labels, domains, typicality=t).loss.backward()
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert len(reads) == 1, reads
    if DEVICE.type == "cuda":
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_out_of_range_index_never_reaches_a_kernel(monkeypatch, rng):
    launched = []
    _record_launches(monkeypatch, launched.append)
    B, T, D = 4, 3, 8
    hidden = tuple(_randn(B, T, D, g=rng) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mft = fastmft.MFTLoss(D, 2, 3, layers=(1, 2)).to(DEVICE)
    labels = torch.tensor([0, 1, 2, 0], device=DEVICE)  # 2 is outside [0, 2)
    with fastmft.use_backend("triton"), pytest.raises(ValueError, match="labels holds 2"):
        mft(hidden, mask, labels, torch.zeros(B, dtype=torch.long, device=DEVICE))
    with fastmft.use_backend("triton"), pytest.raises(ValueError, match="corrupted holds 3"):
        mft(
            hidden,
            mask,
            labels.clamp_max(1),
            torch.zeros(B, dtype=torch.long, device=DEVICE),
            corrupted=torch.tensor([0, 1, 3, 0], device=DEVICE),
        )
    assert launched == []


def test_fallback_rules_send_what_the_kernels_do_not_take_to_the_reference(rng, monkeypatch):
    from fastmft.ops import dispatch

    launched = []
    _record_launches(monkeypatch, launched.append)
    K = kt.MAX_DOMAINS + 1
    x = _randn(20, 8, g=rng)
    y = torch.zeros(20, dtype=torch.long, device=DEVICE)
    k = torch.randint(0, K, (20,), generator=rng).to(DEVICE)
    centers, counts = prototypes64(x, y, k, 1, K)
    protos = fastmft.Prototypes(centers.float(), counts)
    assert dispatch.fallback_reason("typicality", "triton", x, y, k, protos.centers[:, :, None], None, 0.5, 1.0) == (
        f"more than {kt.MAX_DOMAINS} domains"
    )
    with fastmft.use_backend("triton"):
        t = fastmft.typicality(x, y, k, protos)
    assert launched == []
    assert_close(t, typicality64(x, y, k, protos.centers, counts, 0.5), torch.float32)
    logits = [_randn(4, 2, g=rng) for _ in range(cross_entropy.MAX_HEADS + 1)]
    assert dispatch.fallback_reason("multi_head_cross_entropy", "triton", logits, None, None, None, -100) == (
        f"more than {cross_entropy.MAX_HEADS} heads"
    )
    assert dispatch.fallback_reason("multi_head_cross_entropy", "triton", logits[:2], None, None, None, -100) is None
