"""What of the orchestrator's outgoing messages may wait a tick to go out merged.

Per step a transaction sends a dispatch, the step's deadline timer and a wake-up event. Only
the dispatch is on the task's critical path. Timers fire at a tier's TTL with a second of
tolerance, and progress wake-ups only prompt gateways to re-read the store, so both may wait
a tenth of a second in the outbox (``aiso.store.outbox``) and leave merged: the timers of one
delay tier as one timer message, the progress wake-ups of every task as one ``task.progress``
message. The wake-up that ends a task is never held back: a client waiting on ``?wait=``
answers on it.
"""

from __future__ import annotations

import json
import uuid

from aiso import topology
from aiso.orchestrator.timers import parse_timers, timer_messages
from aiso.store import TERMINAL_EVENT_KINDS, OutboxMessage

__all__ = ["OrchestratorCoalescing"]

_DELAY_EXCHANGES = frozenset(topology.delay_exchange(tier) for tier in topology.DELAY_TIERS)
_PROGRESS = "progress"
_TIMERS = "timers"
_PROGRESS_NAMESPACE = uuid.UUID("5c6a3a0e-2f4b-4a87-9c1e-0d9b7f2a6000")


class OrchestratorCoalescing:
    """Timers merge by delay tier, progress wake-ups all together; see the module docstring."""

    def group(self, message: OutboxMessage) -> str | None:
        if message.exchange in _DELAY_EXCHANGES:
            return _TIMERS
        if message.exchange == topology.EVENTS_EXCHANGE:
            ends_task = topology.event_kind(message.routing_key) in TERMINAL_EVENT_KINDS
            return None if ends_task else _PROGRESS
        return None

    def merge(self, group: str, messages: list[OutboxMessage]) -> list[OutboxMessage]:
        if group == _TIMERS:
            # Regrouped by the tier that fits each timer now: a tick later it may be a shorter one.
            return timer_messages([t for m in messages for t in parse_timers(m.body)])
        events = [json.loads(m.body) for m in messages]
        key = ",".join(m.message_id for m in messages)
        return [
            OutboxMessage(
                exchange=topology.EVENTS_EXCHANGE,
                routing_key=topology.PROGRESS_ROUTING_KEY,
                message_id=str(uuid.uuid5(_PROGRESS_NAMESPACE, key)),
                body=json.dumps({"events": events}).encode(),
            )
        ]
