"""The library layers report through exceptions, ``warnings`` and ``logging``, never by printing:
only the commands (fastmft/cli) write to the terminal, and they show fastmft's warnings as one line."""

import ast
import sys
import warnings
from pathlib import Path

import fastmft

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for p in sorted((ROOT / "fastmft").rglob("*.py")) if "cli" not in p.relative_to(ROOT / "fastmft").parts]


def _prints(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


def test_no_print_in_the_library_layers():
    assert len(LIBRARY) > 30 and (ROOT / "fastmft" / "pipelines" / "typicality" / "stream.py") in LIBRARY
    found = {str(p.relative_to(ROOT)): lines for p in LIBRARY if (lines := _prints(p))}
    assert not found, f"print( in library modules (use warnings or logging): {found}"


def test_commands_show_fastmft_warnings_on_one_line(capsys):
    from fastmft import cli

    ours = str(Path(fastmft.__file__).resolve().parent / "runtime" / "files.py")
    passed_on = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, *rest: passed_on.append(
            (str(message), filename)
        )
        cli._one_line_warnings("score")
        warnings.warn_explicit("checkpoint x is unreadable", RuntimeWarning, ours, 1)
        warnings.warn_explicit("not ours", UserWarning, str(Path(sys.prefix) / "other.py"), 7)
    assert capsys.readouterr().err == "fastmft score: warning: checkpoint x is unreadable\n"
    assert passed_on == [("not ours", str(Path(sys.prefix) / "other.py"))]  # left to Python's (or pytest's) display
