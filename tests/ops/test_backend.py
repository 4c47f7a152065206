"""Backend selection: environment variable, context manager, and clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import fastmft
from fastmft.ops import dispatch


def test_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("FASTMFT_BACKEND", "torch")
    assert fastmft.current_backend() == "torch"
    with fastmft.use_backend("triton"):
        assert fastmft.current_backend() == "triton"
        with fastmft.use_backend("auto"):
            assert fastmft.current_backend() == "auto"
        assert fastmft.current_backend() == "triton"
    assert fastmft.current_backend() == "torch"
    monkeypatch.setenv("FASTMFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTMFT_BACKEND must be one of auto, torch, triton"):
        fastmft.current_backend()
    with pytest.raises(ValueError, match="use_backend"):
        with fastmft.use_backend("fast"):
            pass


def test_auto_runs_the_reference_on_cpu():
    with fastmft.use_backend("auto"):
        assert dispatch.which("typicality", "cpu") == "torch"
        assert dispatch.resolve("typicality", torch.device("cpu")).kind == "torch"


def test_dispatch_loads_the_backends_itself():
    """Resolving an op needs no public module imported first: dispatch imports the references."""
    code = (
        "import sys, torch\n"
        "from fastmft.ops import dispatch\n"
        "ops = ('masked_mean_pool', 'prototype_sums', 'typicality', 'multi_head_cross_entropy', 'inner_step')\n"
        "with dispatch.use_backend('torch'):\n"
        "    print(*{dispatch.resolve(op, torch.device('cpu')).kind for op in ops})\n"
        "print(*sorted(m for m in sys.modules if m in ('fastmft.ops.functional', 'fastmft.ops.prototypes')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["torch", ""]


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, fastmft\n"
        "with fastmft.use_backend('triton'):\n"
        "    fastmft.masked_mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr
