"""Which lines of the children's output ``aiso dev`` shows on its console.

Every line goes to ``.aiso/logs/<process>.log``; the console only gets what needs a look
(warnings, errors, crashes), or everything with ``--verbose``. A line without a level of
its own — a traceback, a wrapped message — follows the verdict of the line before it, so a
shown error keeps its traceback and a hidden INFO keeps its continuation hidden.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

__all__ = ["LineFilter", "tail"]

# The level as aiso's own format ("<date> <time> <component> LEVEL logger: …") and uvicorn's
# ("LEVEL:     …") print it; both put it within the first few words of the line.
_LEVEL = re.compile(r"^(?:\S+\s+){0,3}(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b:?")
_SHOWN_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})


class LineFilter:
    """Decides, per process, whether a line of its output is worth showing."""

    def __init__(self, *, verbose: bool = False) -> None:
        self.verbose = verbose
        self._showing: dict[str, bool] = {}

    def __call__(self, process: str, line: str) -> bool:
        if self.verbose:
            return True
        match = _LEVEL.match(line)
        if match is not None:
            show = match.group(1) in _SHOWN_LEVELS
        elif line.startswith("Traceback (most recent call last)"):
            show = True  # an uncaught exception, printed by the interpreter without a level
        else:
            return self._showing.get(process, False) and bool(line.strip())
        self._showing[process] = show
        return show


def tail(path: Path, lines: int = 30) -> list[str]:
    """The last ``lines`` lines of a log file; empty when it does not exist."""
    try:
        with path.open(errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except FileNotFoundError:
        return []
