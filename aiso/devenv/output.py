"""Which lines of the children's output ``aiso dev`` shows on its console.

Every line goes to ``.aiso/logs/<process>.log``; the console only gets what needs a look
(warnings, errors, crashes), or everything with ``--verbose``. A line without a level of its
own — a wrapped message — follows the verdict of the line before it. A traceback is shown as
its exception line only, pointing at the log for the frames: a process that crash-loops
would otherwise repeat forty lines at every restart.
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
_TRACEBACK = "Traceback (most recent call last)"
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")

_HIDDEN, _SHOWN, _FRAMES, _EXCEPTION = "hidden", "shown", "frames", "exception"


class LineFilter:
    """Decides, per process, whether and how a line of its output is shown."""

    def __init__(self, *, log_dir: Path, verbose: bool = False) -> None:
        self.log_dir = log_dir
        self.verbose = verbose
        self._state: dict[str, str] = {}

    def __call__(self, process: str, line: str) -> str | None:
        """The text to show for ``line``, or None to keep it in the log only."""
        if self.verbose:
            return line
        state = self._state.get(process, _HIDDEN)
        level = _LEVEL.match(line)
        if level is not None:
            state = _SHOWN if level.group(1) in _SHOWN_LEVELS else _HIDDEN
            self._state[process] = state
            return line if state == _SHOWN else None
        if line.startswith(_TRACEBACK) or line.startswith(_CHAINED):
            self._state[process] = _FRAMES
            return None
        if state == _FRAMES and line and not line[0].isspace():
            self._state[process] = _EXCEPTION
            return f"{line}  (traceback in {self.log_dir / process}.log)"
        if state in (_SHOWN, _EXCEPTION) and line.strip():
            return line
        return None


def tail(path: Path, lines: int = 30) -> list[str]:
    """The last ``lines`` lines of a log file; empty when it does not exist."""
    try:
        with path.open(errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except FileNotFoundError:
        return []
