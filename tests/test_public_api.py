"""The names ``fastmft`` exports (docs/design.md, section 3) resolve to the objects of the modules
that define them, and ``import fastmft`` alone imports no torch."""

import importlib
import subprocess
import sys

import fastmft


def test_every_exported_name_resolves_to_its_definition():
    names = []
    for module, exported in fastmft._EXPORTS.items():
        for name in exported.split():
            assert getattr(fastmft, name) is getattr(importlib.import_module(module), name), name
            names.append(name)
    assert sorted([*names, "kernels"]) == fastmft.__all__ and set(fastmft.__all__) <= set(dir(fastmft))
    assert fastmft.kernels.__name__ == "fastmft.kernels"


def test_import_fastmft_imports_no_torch():
    code = "import sys, fastmft; print('torch' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_command_help_imports_no_torch():
    """`fastmft CMD --help` builds only argparse from torch-free modules (answers in ~0.1 s)."""
    code = (
        "import sys\nfrom fastmft.cli import COMMANDS, build_parser\n"
        "for command in COMMANDS: build_parser(command)\n"
        "print(len(COMMANDS), 'torch' in sys.modules, 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[1:] == ["False", "False"] and int(out.split()[0]) >= 5
