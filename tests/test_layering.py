"""The package's layers import only downward, and nothing imports in a cycle (docs/design.md,
"Layers"). Read from the source with ast, so it covers imports inside functions too; only a
module's ``if __name__ == "__main__":`` block (a script entry point) may call the command line."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer of each module (by the longest matching prefix); a module may import its own layer and
# the ones below it.
LAYERS = {
    "fastmft.kernels": 0,  # Triton only
    "fastmft.ops": 1,  # the math: checks, references, autograd over the kernels, public ops, dispatch
    "fastmft._C": 1,  # the compiled extension's loader
    "fastmft._lazy": 0,  # PEP 562 exports of the packages; imports nothing of fastmft
    "fastmft.data": 2,  # sources, schema and validation, batching, the demo corpus
    "fastmft.runtime": 3,  # devices, process group, backbones, crash-safe files
    "fastmft.pipelines": 4,  # orchestration without argparse, and its figures
    "fastmft.integrations": 4,  # other libraries' training loops (transformers.Trainer) over the ops
    "fastmft.cli": 5,  # commands
    "fastmft.__main__": 6,
    "fastmft": 6,  # the package's lazy re-exports
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "fastmft").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "fastmft.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_layering.py: add it")
    return LAYERS[best]


def _is_main_guard(node) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports(module: str, path: Path) -> set[str]:
    """fastmft modules that ``module`` imports anywhere, except under a __main__ guard."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {id(n) for guard in tree.body if _is_main_guard(guard) for n in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fastmft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastmft":
                continue
            # "from . import x" names a submodule, "from .x import f" a module's member
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m != module}


MODULES = _modules()
GRAPH = {m: imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    upward = sorted(t for t in GRAPH[module] if layer(t) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def test_no_import_cycles():
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t in MODULES and t != "fastmft":  # the package itself is imported before any submodule
                visit(t)
        stack.pop()

    for m in sorted(MODULES):
        visit(m)
    assert not cycles, cycles


def test_the_checker_sees_upward_imports_and_cycles(tmp_path):
    """The rules above must be able to fail."""
    assert layer("fastmft.ops.nn") < layer("fastmft.pipelines.trainer") < layer("fastmft.cli.train")
    assert "fastmft.ops.functional" in GRAPH["fastmft.ops.nn"]
    assert "fastmft.kernels.typicality" in GRAPH["fastmft.ops.triton"]
    fake = tmp_path / "mod.py"
    fake.write_text("from ..cli import main\n\nif __name__ == '__main__':\n    from fastmft.cli import main\n")
    assert imports("fastmft.ops.fake", fake) == {"fastmft.cli"}


def test_every_subpackage_is_installed():
    """pyproject lists the packages a wheel carries: a new subpackage missing there works in an
    editable install (CI) but is absent from a built one."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastmft").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
