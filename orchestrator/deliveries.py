"""Incoming messages as the batcher settles them: acked once applied, or given back.

A message that failed to apply is given back for redelivery. When the store itself was at
fault (down, restarting, locked) no message is to blame, and it goes back without counting a
failed delivery (``basic.nack``). Otherwise the message failed: it goes back counted
(``basic.reject``, which RabbitMQ counts in ``x-delivery-count`` on every version, whereas
``basic.nack`` stopped counting in 4.3), and once it has been delivered ``limit`` times it
can never apply (a corrupt row, a bug), and retrying it every second forever helps no one. It
is then parked in ``aiso.orchestrator.dead`` with the reason and acked, and the orchestrator
goes on with the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

__all__ = ["Delivery", "Incoming", "Redelivery", "SharedDelivery", "is_transient"]

log = logging.getLogger("aiso.orchestrator")

Park = Callable[[AbstractIncomingMessage, str], Awaitable[None]]
"""Publishes a message, with the reason, to the orchestrator's dead queue (confirmed)."""


def is_transient(exc: BaseException) -> bool:
    """A failure of the store itself rather than of the message."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | OSError | TimeoutError)


class Redelivery:
    """Decides what becomes of a message that failed to apply; see the module docstring."""

    def __init__(self, limit: int, park: Park) -> None:
        self.limit = limit
        self.park = park

    async def give_back(self, message: AbstractIncomingMessage, exc: BaseException) -> None:
        # Quorum queues count earlier deliveries in this header; the first has none.
        earlier = (message.headers or {}).get("x-delivery-count")
        delivered = (earlier if isinstance(earlier, int) else 0) + 1
        if is_transient(exc):
            await message.nack(requeue=True)
            return
        if delivered < self.limit:
            await message.reject(requeue=True)
            return
        reason = f"failed {delivered} times: {type(exc).__name__}: {exc}"[:1000]
        await self.park(message, reason)
        await message.ack()
        log.error(
            "parked message %s in the orchestrator's dead queue: %s", message.message_id, reason
        )


class Delivery(Protocol):
    """What a batch settles: an incoming message, or a share of one (``SharedDelivery``)."""

    async def ack(self) -> None: ...

    async def give_back(self, exc: BaseException) -> None: ...


class Incoming:
    """One incoming message carrying one piece of work."""

    def __init__(self, message: AbstractIncomingMessage, redelivery: Redelivery) -> None:
        self.message = message
        self._redelivery = redelivery

    async def ack(self) -> None:
        await self.message.ack()

    async def give_back(self, exc: BaseException) -> None:
        await self._redelivery.give_back(self.message, exc)


class SharedDelivery:
    """One message carrying several pieces of work (a batch of timers): acked once every
    piece is applied, given back if any piece failed. Redelivery re-applies the pieces that
    did succeed, which their compare-and-set turns into no-ops."""

    def __init__(
        self, message: AbstractIncomingMessage, parts: int, redelivery: Redelivery
    ) -> None:
        self.message = message
        self._pending = parts
        self._failure: BaseException | None = None
        self._redelivery = redelivery

    async def _settle(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            if self._failure is not None:
                await self._redelivery.give_back(self.message, self._failure)
            else:
                await self.message.ack()

    async def ack(self) -> None:
        await self._settle()

    async def give_back(self, exc: BaseException) -> None:
        self._failure = self._failure or exc
        await self._settle()
