"""In-process fan-out of task events from ``aiso.events`` to waiting requests.

Each gateway process binds one private queue to ``task.#`` and hands every event to the
requests watching that task (SSE streams, ``?wait=``); progress events come several to a
message (``aiso.orchestrator.coalescing``). Events only wake those requests: what
they send is read from the store, which holds every event in order. A lost or late AMQP event
therefore delays a client at most until its next store re-check, and never reorders anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from aiso.store import TERMINAL_EVENT_KINDS, EventRecord

__all__ = ["TERMINAL_KINDS", "EventHub"]

log = logging.getLogger("aiso.wrapper.events")

TERMINAL_KINDS = TERMINAL_EVENT_KINDS
"""Event kinds that end a task: nothing follows them."""


class EventHub:
    """task id → the queues of the requests currently watching that task."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[EventRecord | None]]] = {}
        self._closed = False

    @contextmanager
    def subscribe(self, task_id: str) -> Iterator[asyncio.Queue[EventRecord | None]]:
        """Receive the task's events for as long as the block runs; ``None`` means the hub
        closed and no more will come."""
        queue: asyncio.Queue[EventRecord | None] = asyncio.Queue()
        if self._closed:
            queue.put_nowait(None)
        self._watchers.setdefault(task_id, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers.get(task_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[task_id]

    def watching(self, task_id: str) -> bool:
        """Whether any request is subscribed to the task."""
        return task_id in self._watchers

    def close(self) -> None:
        """Tell every watcher to stop: the gateway is shutting down. Streams end and waits
        answer at once instead of holding shutdown; clients resume on another replica."""
        self._closed = True
        for watchers in self._watchers.values():
            for queue in watchers:
                queue.put_nowait(None)

    def publish(self, event: EventRecord) -> None:
        for queue in self._watchers.get(event.task_id, ()):
            queue.put_nowait(event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Consumer callback for the events queue (consumed with ``no_ack``): one event, or
        several tasks' progress events in one message (``{"events": [...]}``)."""
        try:
            body = json.loads(message.body)
            items = body.get("events", [body])
            events = [_event(item) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed event %s: %s", message.message_id, exc)
            return
        for event in events:
            self.publish(event)


def _event(item: dict[str, Any]) -> EventRecord:
    return EventRecord(
        id=int(item["id"]),
        task_id=str(item["task_id"]),
        kind=str(item["kind"]),
        data=dict(item.get("data") or {}),
        created_at=datetime.fromisoformat(item["at"]),
    )
