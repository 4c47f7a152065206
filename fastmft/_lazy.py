"""Package attributes that load on first use (PEP 562), so that importing a package, or a light
module inside it, does not pay for torch and datasets: ``fastmft CMD --help`` stays fast."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(
    package: str, modules: dict[str, str], submodules: tuple[str, ...] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``. ``modules`` maps each defining module
    (absolute, or relative to ``package`` with a leading dot) to the public names it exports,
    separated by spaces; ``submodules`` are subpackages reachable as attributes
    (``fastmft.kernels``)."""
    where = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where, *submodules})

    return __getattr__, __dir__, sorted([*where, *submodules])
