"""Bad input to the Triton backend fails with a clear error before any kernel is launched."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmft
from fastmft.kernels import cross_entropy, pooling
from fastmft.kernels import typicality as ktyp
from tests.helpers import DEVICE


@pytest.fixture(autouse=True)
def on_test_device():
    """Factories below make tensors on the test device (the checks must fire there too)."""
    with torch.device(DEVICE):
        yield


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come before."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    for mod, names in (
        (pooling, ["pool_forward", "pool_backward"]),
        (ktyp, ["typicality", "prototype_sums"]),
        (cross_entropy, ["forward", "backward"]),
    ):
        for name in names:
            monkeypatch.setattr(mod, name, boom)


def test_out_of_range_indices(no_launch):
    x = torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, 3])
    k = torch.tensor([0, 1, 0, 1])
    protos = fastmft.Prototypes(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.int64))
    with fastmft.use_backend("triton"):
        with pytest.raises(ValueError, match="labels holds 3, outside"):
            fastmft.typicality(x, y, k, protos)
        with pytest.raises(ValueError, match="domains holds -1"):
            fastmft.typicality(x, torch.zeros(4, dtype=torch.int64), torch.tensor([0, -1, 0, 0]), protos)
        with pytest.raises(ValueError, match="labels holds 3"):
            fastmft.class_prototypes(x, y, k, 3, 2)
        with pytest.raises(ValueError, match=r"targets\[1\] holds 5"):
            fastmft.multi_head_cross_entropy(
                [torch.randn(4, 3), torch.randn(4, 5)], [torch.tensor([0, 1, 2, -100]), torch.tensor([0, 5, 1, 1])]
            )


def test_mismatched_shapes_and_dtypes(no_launch):
    with fastmft.use_backend("triton"):
        with pytest.raises(ValueError, match="attention_mask"):
            fastmft.masked_mean_pool(torch.randn(2, 5, 4), torch.ones(2, 6))
        with pytest.raises(ValueError, match=r"hidden_states\[1\]"):
            fastmft.masked_mean_pool([torch.randn(2, 5, 4), torch.randn(2, 5, 3)], torch.ones(2, 5))
        with pytest.raises(TypeError, match="hidden_states"):
            fastmft.masked_mean_pool(torch.ones(2, 5, 4, dtype=torch.int32), torch.ones(2, 5))
        with pytest.raises(ValueError, match="rows"):
            fastmft.multi_head_cross_entropy(
                [torch.randn(4, 3), torch.randn(5, 3)], [torch.zeros(4, dtype=torch.int64)] * 2
            )
        with pytest.raises(ValueError, match="sample_weight"):
            fastmft.multi_head_cross_entropy(
                [torch.randn(4, 3)], [torch.zeros(4, dtype=torch.int64)], sample_weight=torch.ones(3)
            )
        with pytest.raises(TypeError, match="integer"):
            fastmft.multi_head_cross_entropy([torch.randn(4, 3)], [torch.zeros(4)])
        protos = fastmft.Prototypes(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match="dim"):
            fastmft.typicality(
                torch.randn(4, 7), torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), protos
            )


def test_launch_helpers_reject_unsupported_dtypes():
    """Called directly (not through dispatch, which sends float64 to the reference)."""
    with pytest.raises(TypeError, match="float64"):
        pooling.pool_forward([torch.randn(2, 3, 4, dtype=torch.float64)], torch.ones(2, 3), False)
    with pytest.raises(TypeError, match="float64"):
        ktyp.prototype_sums(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="float64"):
        cross_entropy.forward(
            [torch.randn(3, 2, dtype=torch.float64)], [torch.zeros(3, dtype=torch.int64)], None, [1.0], -100
        )


def test_cpu_tensors_without_interpreter_fail_clearly():
    """A fresh process without TRITON_INTERPRET: the triton backend on CPU tensors is a clear
    RuntimeError through dispatch and through the launch helpers, never a crash."""
    code = textwrap.dedent(
        """
        import torch, fastmft
        from fastmft.kernels import pooling, cross_entropy
        from fastmft.kernels import typicality as ktyp
        x = torch.randn(2, 5, 4); m = torch.ones(2, 5)
        y = torch.zeros(2, dtype=torch.int64)
        protos = fastmft.Prototypes(torch.randn(1, 1, 4), torch.ones(1, 1, dtype=torch.int64))
        calls = {
            "pool": lambda: fastmft.masked_mean_pool(x, m),
            "mhce": lambda: fastmft.multi_head_cross_entropy([torch.randn(2, 3)], [y]),
            "typicality": lambda: fastmft.typicality(torch.randn(2, 4), y, y, protos),
            "prototypes": lambda: fastmft.class_prototypes(torch.randn(2, 4), y, y, 1, 1),
            "kernel_pool": lambda: pooling.pool_forward([x], m, False),
            "kernel_mhce": lambda: cross_entropy.forward([torch.randn(2, 3)], [y], None, [1.0], -100),
            "kernel_sums": lambda: ktyp.prototype_sums(torch.randn(2, 4), y, 1),
        }
        with fastmft.use_backend("triton"):
            for name, call in calls.items():
                try:
                    call()
                    print(name, "NO ERROR")
                except RuntimeError as e:
                    assert "TRITON_INTERPRET" in str(e), e
                    print(name, "ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTMFT_BACKEND"] = "auto"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert sum(line.endswith(" ok") for line in lines) == 7, proc.stdout
