"""The options of the ``fastmft`` commands, made from the fields of their config dataclasses
(fastmft.runtime.settings): name, type, default, range, choices and help text are declared once,
on the field. Also ``--config FILE``: settings from a JSON or YAML file, under the command line's.
argparse only: importing this module costs nothing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path

from fastmft.runtime.settings import option_name, range_error, value_type


def add_settings(parser, cls, skip: typing.Collection[str] = ()) -> None:
    """One argument per field of config class ``cls`` (but ``skip``): its type, default and help.
    A boolean field is a flag: --name sets a False default, --no-name clears a True one. A list or
    tuple is comma-separated. A field without a default is a required option (or positional). The
    help texts name other fields as `field`; here they name the flag."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, kind, name = f.metadata, value_type(cls, f.name), option_name(cls, f.name)
        help = _FIELD.sub(lambda m: f"--{option_name(cls, m[1])}" if m[1] in fields else m[0], meta.get("help", ""))
        help = help or None
        required = f.default is dataclasses.MISSING
        if meta.get("positional"):
            nargs = "+" if typing.get_origin(kind) in (list, tuple) else None
            parser.add_argument(f.name, nargs=nargs, metavar=meta.get("metavar"), help=help)
            continue
        if kind is bool:
            flag, action = (f"--no-{name}", "store_false") if f.default else (f"--{name}", "store_true")
            parser.add_argument(flag, dest=f.name, action=action, help=f"do not {help}" if f.default else help)
            continue
        flags = [f"--{name}", *([meta["short"]] if meta.get("short") else [])]
        choices = meta.get("choices")
        metavar = None if choices else meta.get("metavar") or name.upper().replace("-", "_")
        parser.add_argument(
            *flags,
            dest=f.name,
            type=_argument_type(kind, meta),
            choices=choices,
            required=required,
            default=None if required else f.default,
            metavar=metavar,
            help=help,
        )


_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def _argument_type(kind, meta):
    """argparse type of a field: a comma list for a list or tuple, the field's range checked."""
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        return _comma_list(typing.get_args(kind)[0], origin)
    if meta.get("low") is None:
        return kind

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        why = range_error(kind, meta, value)
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _comma_list(kind, container):
    """argparse type of comma-separated ``kind`` values (blanks dropped), as a ``container``."""

    def parse(text: str):
        try:
            return container(kind(v) for v in (s.strip() for s in text.split(",")) if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def config_from_args(cls, args: argparse.Namespace, **given):
    """The config of class ``cls`` from the parsed options (each field from its option), and ``given``."""
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given)


# --config FILE: the settings of a run in a file, so that a long command can be kept and shared.


def add_config_argument(parser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings from a JSON (or, with PyYAML, YAML) file of {name: value}, named as the options "
        "(batch_size or batch-size); options given on the command line win",
    )


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """When ``argv`` has --config FILE: the file's settings become ``parser``'s defaults, each
    checked as its option would be. Raises ValueError naming the file and the setting."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return
    actions = {}
    for action in parser._actions:
        if action.dest not in ("help", "config", argparse.SUPPRESS):
            names = {action.dest, *(s.lstrip("-") for s in action.option_strings if s.startswith("--"))}
            actions.update({n.replace("_", "-"): action for n in names})
    for key, value in read_config_file(path).items():
        action = actions.get(str(key).replace("_", "-"))
        if action is None:
            raise ValueError(f"--config {path}: unknown setting {key!r}; `{parser.prog} --help` lists the options")
        try:
            value = _file_value(action, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ValueError(f"--config {path}: {key}: {err}") from None
        if isinstance(action, argparse._StoreFalseAction) and key.replace("_", "-").startswith("no-"):
            value = not value  # no-progress: true is progress: false
        parser.set_defaults(**{action.dest: value})
        action.required = False
        if not action.option_strings and action.nargs == "+":  # a positional the file gives
            action.nargs = "*"


def read_config_file(path: str) -> dict:
    """The mapping of a JSON file, or of a YAML one (.yaml, .yml) when PyYAML is installed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write JSON"
            ) from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML: {' '.join(str(err).split())}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}: not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {path}: must hold a mapping of setting names to values, got {type(values).__name__}"
        )
    return values


def _file_value(action: argparse.Action, value):
    """A setting from the file, converted and checked by its option's own type and choices."""
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if value is None:
        if action.required or action.default is not None:
            raise ValueError("must have a value, got null")
        return None
    if not action.option_strings:  # a positional list of strings
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if action.type is None:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
    else:
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        try:
            value = action.type(text)
        except ValueError:  # int("1.5"): say what the setting takes
            raise ValueError(f"must be {getattr(action.type, '__name__', 'another value')}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value
