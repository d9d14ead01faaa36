"""A task's events as a Server-Sent Events stream.

Order of work: subscribe to the hub, replay what the store holds after ``Last-Event-ID``, then
follow live. Live events only wake the stream; frames are always read from the store after
the last id sent, so they come in id order, each once, and none is skipped even when an AMQP
event is lost (the keep-alive tick re-reads the store too). The stream ends after the task's
terminal event, or when the gateway shuts down (the client reconnects with
``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiso.store import EventRecord, Store

from .events import TERMINAL_KINDS, EventHub

__all__ = ["KEEPALIVE_SECONDS", "event_stream", "sse_frame"]

KEEPALIVE_SECONDS = 15.0
"""Quiet time before a comment line is sent: keeps proxies from closing an idle stream."""


def sse_frame(event: EventRecord) -> bytes:
    data = json.dumps(
        {
            "id": event.id,
            "task_id": event.task_id,
            "kind": event.kind,
            "data": event.data,
            "at": event.created_at.isoformat(),
        }
    )
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def event_stream(
    store: Store, hub: EventHub, task_id: str, after: int
) -> AsyncIterator[bytes]:
    with hub.subscribe(task_id) as live:
        # Read the status before the events: a task seen terminal here has its terminal
        # event committed, so the replay below includes it or the client already has it.
        task = await store.get_task(task_id)
        ended = task is None or task.status.terminal
        last = after
        while True:
            for event in await store.events_since(task_id, last):
                yield sse_frame(event)
                last = event.id
                if event.kind in TERMINAL_KINDS:
                    return
            if ended:
                return
            while True:
                try:
                    woke = await asyncio.wait_for(live.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    break
                if woke is None:  # the gateway is shutting down; the client resumes elsewhere
                    return
                if woke.id > last:
                    break
