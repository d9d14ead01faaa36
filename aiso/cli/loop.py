"""The event loop of the long-running processes: uvloop where it is installed.

The orchestrator and the services spend most of their CPU in the event loop's own machinery
(one AMQP frame, one database reply, one timer at a time); uvloop does that work in C and
lowers their CPU per message noticeably. It comes with ``uvicorn[standard]``, which the
gateway already runs on; where it is missing, asyncio's own loop is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
