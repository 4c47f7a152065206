"""Package attributes that load on first use (PEP 562), so that importing a package, or a light
module inside it, does not pay for torch and datasets: ``fastmft --help`` stays fast."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(
    package: str, exports: dict[str, str], submodules: tuple[str, ...] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``. ``exports`` maps each public name to the module
    that defines it (absolute, or relative to ``package`` with a leading dot); ``submodules`` are
    subpackages reachable as attributes (``fastmft.kernels``)."""

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports, *submodules})

    return __getattr__, __dir__
