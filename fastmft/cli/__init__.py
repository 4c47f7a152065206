"""The ``fastmft`` command line: ``train`` (MFT and its baselines), ``typicality`` (score a corpus and
show its most and least typical instances per domain), ``score`` (streaming scoring of large
corpora), ``select`` (meta-learned task selection) and ``demo-data`` (the embedded synthetic corpus).

Each command lives in its own module here and declares its options once. Only the command being
run is imported (with torch and friends): ``fastmft --help`` imports none of them."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

# command -> (its module in fastmft.cli, one-line help)
COMMANDS = {
    "train": ("train", "Meta Fine-Tuning and the paper's baselines; prints per-domain accuracy"),
    "typicality": ("typicality", "score typicality per instance and show the most and least typical per domain"),
    "score": ("score", "streaming, resumable, multi-process typicality scoring of large corpora into Parquet"),
    "select": (
        "select",
        "meta-learned task selection: score source tasks by the target loss after one inner step, train the best",
    ),
    "demo-data": ("demo_data", "write the embedded synthetic multi-domain corpus as JSON lines"),
}


def _has_default(action) -> bool:
    """An option with a value by default (0 included); a flag's default is its absence."""
    return bool(action.option_strings) and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (argparse's own formatter shows none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if _has_default(action) and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and ``command``'s options declared (its module imported)."""
    parser = argparse.ArgumentParser(prog="fastmft", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_Help)
    )
    for name, (module, help) in COMMANDS.items():
        if name == command:
            from .options import add_config_argument

            importlib.import_module(f"{__name__}.{module}").register_cli(sub, help)
            add_config_argument(sub.choices[name])
            for action in sub.choices[name]._actions:  # argparse prints no help line (nor default) without help
                if action.help is None and _has_default(action):
                    action.help = "(default: %(default)s)"
        else:
            sub.add_parser(name, help=help)
    return parser


_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def flag_names(parser: argparse.ArgumentParser, command: str) -> Callable[[str], str]:
    """The library's messages name a setting by its field, as `max_length`; at the command line
    they name the flag that sets it (--max-length). Fields the command has no flag for stay as they are."""
    sub = _subparser(parser, command)
    flags = {a.dest: max(a.option_strings, key=len) for a in sub._actions if a.option_strings}
    return lambda message: _FIELD.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


def _one_line_warnings(command: str, in_flags: Callable[[str], str] = str) -> None:
    """The library warns through ``warnings``; a command shows fastmft's warnings as one line
    (``fastmft score: warning: ...``) and leaves other libraries' as Python formats them."""
    package = str(Path(__file__).resolve().parents[1])
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):
            print(f"fastmft {command}: warning: {in_flags(str(message))}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    if command in COMMANDS:
        from .options import apply_config_file

        try:  # --config FILE: its settings become the defaults, which the command line overrides
            apply_config_file(_subparser(parser, command), argv[argv.index(command) + 1 :])
        except ValueError as err:
            print(f"fastmft {command}: error: {flag_names(parser, command)(str(err))}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    in_flags = flag_names(parser, args.command)
    from fastmft.pipelines.plots import MissingMatplotlib
    from fastmft.runtime.backbone import BackboneNotFound
    from fastmft.runtime.quiet import quiet_libraries

    quiet_libraries()
    _one_line_warnings(args.command, in_flags)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM ends a run as Ctrl-C does
    try:
        if args.command != "demo-data":
            _check_backend(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, BackboneNotFound, MissingMatplotlib) as err:
        print(f"fastmft {args.command}: error: {in_flags(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder made read-only during the run: nothing is half-written
        print(f"fastmft {args.command}: error: {in_flags(str(err))}; rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"fastmft {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: files are closed and temporaries removed as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def _check_backend(args) -> None:
    """FASTMFT_BACKEND against the device the command will use, before any data is read."""
    import torch

    from fastmft.ops.dispatch import check_backend

    try:
        device = torch.device(args.device) if getattr(args, "device", None) else None
    except RuntimeError:
        return  # the command names the bad --device itself
    check_backend(device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
