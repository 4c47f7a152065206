"""The library layers report through exceptions, ``warnings`` and ``logging``, never by printing:
only the commands (fastmft/cli) write to the terminal, and they show fastmft's warnings as one line."""

import ast
import re
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


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
BELOW_CLI = [ROOT / "fastmft" / layer for layer in ("ops", "data", "runtime", "pipelines")]


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module (f-string parts, and each f-string whole) except docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    constants = [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]
    # f-strings also whole, each placeholder read as a word: f"pass --{name}-values" is a flag too
    joined = [
        (node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values))
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
    ]
    return constants + joined


def test_no_message_below_the_cli_names_a_command_line_flag():
    # A Python user never typed --max-length: the library names the field (`max_length`), and the
    # commands translate it (fastmft.cli.flag_names). pip's own flag in the install hint is not ours.
    found = {}
    for layer in BELOW_CLI:
        for path in sorted(layer.rglob("*.py")):
            hits = [(n, f) for n, s in _message_strings(path) for f in FLAG.findall(s) if f != "--no-deps"]
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    assert not found, found
    assert FLAG.findall("a `max_length` or --max-length, not a-b--c") == ["--max-length"], "the check itself"


def test_the_commands_name_the_flag_of_a_field():
    from fastmft import cli

    in_flags = cli.flag_names(cli.build_parser("score"), "score")
    message = "`max_length` 300 is more than 256; pass another `cache_dir`; `no_such_field` stays"
    assert in_flags(message) == "--max-length 300 is more than 256; pass another --cache-dir; `no_such_field` stays"
