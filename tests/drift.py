"""Which installed distributions differ from the last green CI run (.ci/last-green.txt).

The package declares ranges (it is a library), and CI installs the newest versions the index
offers, so a release made after the last green run can break it without any change of ours.
`.ci/run` rewrites .ci/last-green.txt (`pip freeze --all --exclude-editable` of its venv) after a
green run; this module compares the running environment with it, so a red run names the versions
that moved in its first line. Run as `python -m tests.drift`; the test session's summary shows
it too when a test fails.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

LAST_GREEN = Path(__file__).resolve().parent.parent / ".ci" / "last-green.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_freeze(text: str) -> dict[str, str]:
    """`name==version` lines of a pip freeze, by canonical name; other lines are ignored."""
    pins = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name and not name.startswith("#"):
            pins[_canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(last_green: dict[str, str], now: dict[str, str], ignore=("fastmft",)) -> list[str]:
    """One entry per distribution that differs: 'name old -> new', 'name new X', 'name gone (was X)'."""
    changes = []
    for name in sorted(set(last_green) | set(now)):
        if name in ignore:
            continue
        old, new = last_green.get(name), now.get(name)
        if old == new:
            continue
        if old is None:
            changes.append(f"{name} new {new}")
        elif new is None:
            changes.append(f"{name} gone (was {old})")
        else:
            changes.append(f"{name} {old} -> {new}")
    return changes


def summary() -> str:
    if not LAST_GREEN.is_file():
        return f"version drift: no record of a green run ({LAST_GREEN.name} is missing)"
    changes = drift(read_freeze(LAST_GREEN.read_text()), installed())
    if not changes:
        return "version drift: none (installed versions equal the last green run's)"
    return f"version drift against the last green run ({len(changes)}): " + "; ".join(changes)


if __name__ == "__main__":
    print(summary())
