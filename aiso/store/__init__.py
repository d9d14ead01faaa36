"""Task state: tasks, step attempts, events, idempotency keys and the transactional outbox.

SQLAlchemy 2 async over SQLite (``aiosqlite``, the embedded default) or PostgreSQL
(``asyncpg``). Every state change and the messages it causes are written in one transaction;
``OutboxRelay`` publishes those messages afterwards, so a crash between the two loses nothing.
"""

from aiso.store.database import Store, open_store
from aiso.store.model import (
    TERMINAL_EVENT_KINDS,
    EventRecord,
    OutboxMessage,
    StepRecord,
    StepStatus,
    TaskRecord,
    TaskStatus,
)
from aiso.store.outbox import OutboxRelay

__all__ = [
    "TERMINAL_EVENT_KINDS",
    "EventRecord",
    "OutboxMessage",
    "OutboxRelay",
    "StepRecord",
    "StepStatus",
    "Store",
    "TaskRecord",
    "TaskStatus",
    "open_store",
]
