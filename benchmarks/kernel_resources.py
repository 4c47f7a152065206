"""Registers, spills and shared memory of every Triton kernel at the benchmark configurations.

    python -m benchmarks.kernel_resources --compile-only   # no GPU: compile for sm_90, ptxas -v
    python -m benchmarks.kernel_resources                  # on a CUDA machine: the loaded kernels

Compile-only mode drives Triton's real pipeline to PTX through a stand-in driver (nothing runs)
and reads ptxas's resource report for sm_90a; tests/kernels/test_kernel_compile.py fails on any spill
here. On a GPU the numbers come from the loaded kernels (n_regs, n_spills, shared).
Prints one JSON line per (kernel, tile) and writes them to --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

# The sizes the benchmarks and the issue name: typicality with K up to 16 domains, prototype sums
# past 32 cells (the tensor-core path), MFT's heads, up to 8 heads, and a 97-class head.
TYPICALITY_DOMAINS = (2, 5, 8, 16)
SUM_CELLS = (6, 48, 100)
HEAD_SETS = ((3, 4, 4, 4), (2,) * 8, (97, 4), (3, 97, 4, 4, 4, 4, 4, 4))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_all(device: torch.device) -> None:
    """Launch (or, compile-only, build) every kernel at the benchmark configurations."""
    from fastmft.kernels import cross_entropy, pooling, typicality

    for dtype in DTYPES:
        x = torch.randn(4096, 768, device=device).to(dtype)
        y = torch.randint(0, 3, (4096,), device=device)
        for K in TYPICALITY_DOMAINS:
            d = torch.randint(0, K, (4096,), device=device)
            centers = torch.randn(K, 3, 768, device=device)
            typicality.typicality(x, y, d, centers, torch.ones(K, 3, dtype=torch.bool, device=device), 0.5)
        for C in SUM_CELLS:
            typicality.prototype_sums(x, torch.randint(0, C, (4096,), device=device), C)
        layers = [torch.randn(32, 128, 768, device=device).to(dtype) for _ in range(3)]
        mask = torch.ones(32, 128, dtype=torch.bool, device=device)
        out, counts = pooling.pool_forward(layers, mask, True)
        pooling.pool_backward(torch.randn_like(out), mask, counts, True, 128, dtype)
        for classes in HEAD_SETS:
            logits = [torch.randn(4096, c, device=device).to(dtype) for c in classes]
            targets = [torch.randint(0, c, (4096,), device=device) for c in classes]
            w = torch.rand(4096, device=device)
            loss, scale = cross_entropy.forward(logits, targets, w, [1.0] * len(classes), -100)
            cross_entropy.backward(torch.ones((), device=device), logits, targets, w, scale, -100, True)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this architecture (it ships several)."""
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(arch).path


def _ptxas_report(ptx: str) -> dict:
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        pathlib.Path(src).write_text(ptx)
        proc = subprocess.run(
            [_ptxas(int(re.sub(r"\D", "", arch))), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    text = proc.stderr + proc.stdout

    def number(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(
        arch=arch,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=number(r"(\d+) bytes smem"),
    )


def collect(compile_only: bool, out: str | None = None) -> list[dict]:
    """One row per (kernel, dtype, tile), appended to ``out`` as soon as it is known (a run cut
    short by a time limit keeps what it measured)."""
    from triton.runtime.jit import JITFunction

    rows: dict[tuple, dict] = {}
    original_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=warmup or compile_only, **kwargs)
        config = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
        tensors = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]
        dtype = next((str(t.dtype).replace("torch.", "") for t in tensors if t.dtype.is_floating_point), "-")
        key = (self.fn.__name__, dtype, tuple(sorted(config.items())))
        if key not in rows:
            if compile_only:
                usage = _ptxas_report(kernel.asm["ptx"])
            else:
                usage = dict(registers=kernel.n_regs, spill_stores=kernel.n_spills, shared=kernel.metadata.shared)
            rows[key] = dict(kernel=self.fn.__name__, dtype=dtype, config=config, **usage)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(rows[key]) + "\n")
        return kernel

    JITFunction.run = record
    try:
        if compile_only:
            stand_in_driver()
            from fastmft.kernels import _util

            _util.check_device = lambda op, *tensors: tensors[0].device
            launch_all(torch.device("cpu"))
        else:
            launch_all(torch.device("cuda"))
            torch.cuda.synchronize()
    finally:
        JITFunction.run = original_run
    return list(rows.values())


def stand_in_driver() -> None:
    """Make Triton compile for sm_90 on a machine without a GPU (warmup launches only)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandInDriver())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="no GPU: compile for sm_90 and ask ptxas")
    parser.add_argument("--out", help="also append the rows (JSON lines) here, each as soon as it is known")
    args = parser.parse_args(argv)
    if args.compile_only:
        os.environ.pop("TRITON_INTERPRET", None)
    rows = collect(args.compile_only, args.out)
    print("\n".join(json.dumps(r) for r in rows))
    spilled = [r for r in rows if r["spill_stores"]]
    print(f"{len(rows)} kernel configurations, {len(spilled)} with spills", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
