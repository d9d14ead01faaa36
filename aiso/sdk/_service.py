"""``Service``: a handler plus its declared contracts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from aiso.contracts import PayloadType
from aiso.sdk._context import Context
from aiso.topology import SERVICE_NAME_PATTERN

__all__ = ["Handler", "Service", "StartupHook"]

Handler = Callable[[dict[str, Any], dict[str, Any], Context], object]
"""``(payload, params, ctx) -> payload``, as ``async def`` or plain ``def``."""

StartupHook = Callable[[], object]
"""``() -> None``, as ``async def`` or plain ``def``."""

_H = TypeVar("_H", bound=Handler)
_S = TypeVar("_S", bound=StartupHook)


class Service:
    """An AI service: what it accepts and produces, and the function that does the work.

    The declaration is checked here, at import time, so a typo in a name or payload type fails
    when the module loads rather than when the first message arrives::

        service = Service(name="normalize", input=[PayloadType.TEXT], output=PayloadType.TEXT)

        @service.handler
        async def run(payload: dict, params: dict, ctx: Context) -> dict: ...

    A plain ``def`` handler runs in a thread pool, so CPU-bound work does not stall the
    event loop (and with it health checks and message acknowledgements).
    """

    def __init__(
        self,
        name: str,
        *,
        input: Iterable[PayloadType | str],
        output: PayloadType | str,
        version: str = "0.1.0",
        concurrency: int = 4,
        description: str = "",
    ) -> None:
        if not re.match(SERVICE_NAME_PATTERN, name):
            raise ValueError(f"invalid service name {name!r}: must match {SERVICE_NAME_PATTERN}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.name = name
        self.input: tuple[PayloadType, ...] = tuple(PayloadType(t) for t in input)
        if not self.input:
            raise ValueError("a service accepts at least one payload type")
        self.output = PayloadType(output)
        self.version = version
        self.concurrency = concurrency
        self.description = description
        self._handler: Handler | None = None
        self._startup: list[StartupHook] = []

    def handler(self, fn: _H) -> _H:
        """Register the function that processes one payload (exactly one per service)."""
        if self._handler is not None:
            raise ValueError(f"service {self.name!r} already has a handler")
        self._handler = fn
        return fn

    def on_startup(self, fn: _S) -> _S:
        """Register a hook run before the first message (load models, warm caches).

        Hooks run in registration order; the replica reports ready only after all finished.
        """
        self._startup.append(fn)
        return fn

    def __repr__(self) -> str:
        accepts = ",".join(t.value for t in self.input)
        return f"Service({self.name!r} {accepts}->{self.output.value} v{self.version})"
