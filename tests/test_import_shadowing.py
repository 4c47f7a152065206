"""No top-level name of the repository shadows an installed distribution (the `kernels` break).

`python -m ...` and `python -c` put the working directory first on sys.path, so from the
repository root every folder there is importable by its bare name. transformers 5.25 imports Hugging
Face's `kernels` package when a BERT class loads; our `kernels/` (the Triton code, installed as
fastmft.kernels) was a regular package and won, so every documented command that loads a BERT
failed. These tests run in the project's own environment, from the repository root, in a fresh
interpreter, as a user's command would.
"""

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").rglob("README.md"))]


def _from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _top_level_names() -> list[str]:
    """What `import NAME` could find at the repository root: folders and .py files."""
    names = []
    for path in sorted(ROOT.iterdir()):
        if path.name.startswith(".") or path.name == "fastmft":
            continue
        if path.is_dir() or path.suffix == ".py":
            names.append(path.stem)
    return names


def _installed_top_level() -> dict[str, list[str]]:
    """Top-level module name -> the installed distributions that provide it (fastmft excluded)."""
    provided = metadata.packages_distributions()
    return {name: [d for d in dists if d.lower() != "fastmft"] for name, dists in provided.items()}


def test_no_repository_folder_shadows_an_installed_distribution():
    installed = _installed_top_level()
    clashes = [name for name in _top_level_names() if installed.get(name)]
    assert "kernels" in clashes or "kernels" not in installed, "the check itself is broken"
    if not clashes:
        pytest.skip("no installed distribution shares a top-level name with the repository")
    code = f"import importlib, json; print(json.dumps({{n: str(importlib.import_module(n).__spec__.origin or list(importlib.import_module(n).__path__)) for n in {clashes!r}}}))"
    done = _from_root(code)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {name: [ROOT / name, ROOT / f"{name}.py"] for name in found}
    shadowed = {n: o for n, o in found.items() if any(str(o).startswith(str(p)) for p in ours[n])}
    assert not shadowed, (
        f"from the repository root these names import the repository's folder instead of the installed "
        f"distribution {[installed[n] for n in shadowed]}: {shadowed}"
    )


def test_our_kernels_folder_is_not_a_regular_package():
    # A regular package anywhere on sys.path beats every namespace portion (PEP 420); without an
    # __init__.py, kernels/ can never win over an installed `kernels`, whatever gets installed later.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    import fastmft.kernels.pooling

    assert Path(fastmft.kernels.pooling.__file__).resolve().parent == (ROOT / "kernels").resolve()


def _documented_modules() -> list[str]:
    modules = set()
    for doc in DOCS:
        for name in re.findall(r"python -m ([A-Za-z_][\w.]*)", doc.read_text()):
            if name.split(".")[0] not in {"pytest", "pip", "venv"}:
                modules.add(name.rstrip("."))
    return sorted(modules)


def test_documented_commands_import_from_the_repository_root():
    modules = _documented_modules()
    assert "benchmarks.run" in modules, f"no documented `python -m` command found in {[d.name for d in DOCS]}"
    modules += ["transformers.models.bert.modeling_bert", "transformers.integrations.hub_kernels"]
    done = _from_root(f"import importlib\nfor name in {modules!r}:\n    importlib.import_module(name)\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
