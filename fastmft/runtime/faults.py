"""The test seam: the one place where tests make a run fail at a chosen moment. No other fastmft
code injects faults, and none of this is a user setting.

The product calls :func:`fault_point` with a name at each moment a crash must be survivable. Two
ways in, both for tests only:

- ``FASTMFT_TEST_FAULT="point:n"`` (subprocess tests): SIGKILL this process the n-th time (default
  the first) ``point`` is reached; stdout and stderr are flushed first.
- :data:`HOOK`, a callable taking the point's name (in-process tests): called at every point
  before the variable is read; it may raise to stop the run there.

Unset, a point costs one global read and one environment lookup.

Points: ``batch`` (a batch encoded), ``chunk-write`` (between a chunk's embeddings and its
metadata), ``score`` (a chunk scored in pass two), ``merge`` (a chunk merged into the output):
all in ``fastmft score`` (fastmft.pipelines.typicality).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

ENV = "FASTMFT_TEST_FAULT"

HOOK: Callable[[str], None] | None = None

_reached: dict[str, int] = {}  # point -> times reached in this process (only while ENV names it)


def fault_point(name: str) -> None:
    """A named moment where a test may make the run fail (module docstring)."""
    if HOOK is not None:
        HOOK(name)
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(n or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
