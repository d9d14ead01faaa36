"""Schema of the task store (SQLAlchemy Core). Migrations in ``migrations/`` create it."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

__all__ = [
    "events",
    "idempotency_keys",
    "metadata",
    "outbox",
    "service_health",
    "step_attempts",
    "tasks",
    "webhook_deliveries",
]

metadata = MetaData()

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("pipeline", String(63), nullable=False),
    Column("status", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("callback_url", Text),
    Column(
        "callback_progress",
        Boolean,
        nullable=False,
        server_default=false(),
        comment="also send step events to callback_url",
    ),
    Column("plan", JSON, nullable=False, comment="ResolvedPipeline snapshot taken at submission"),
    Column("result", JSON),
    Column("error", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_tasks_status_finished", "status", "finished_at"),
)

step_attempts = Table(
    "step_attempts",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("task_id", String(36), ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("step", String(63), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("service", String(63), nullable=False),
    Column("status", String(16), nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("output", JSON),
    Column("error", JSON),
    Column("replica", String(255)),
    Column("dispatched_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    UniqueConstraint("task_id", "step", "attempt", name="uq_step_attempt"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_outbox_created", "created_at"),
)

events = Table(
    "task_events",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("task_id", String(36), ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_task_events_task", "task_id", "id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("task_id", String(36), ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

service_health = Table(
    "service_health",
    metadata,
    Column("service", String(63), primary_key=True),
    Column("breaker", String(16), nullable=False, comment="closed | open | half_open"),
    Column("consecutive_failures", Integer, nullable=False),
    Column("window_started_at", DateTime(timezone=True)),
    Column("window_total", Integer, nullable=False),
    Column("window_failures", Integer, nullable=False),
    Column("opened_at", DateTime(timezone=True)),
    Column("probe_until", DateTime(timezone=True), comment="half-open: the probe's deadline"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(64), primary_key=True, comment="webhook-id, stable across retries"),
    Column("task_id", String(36), ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    Column("event", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False, comment="pending | delivered | abandoned"),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    Index("ix_webhook_due", "status", "next_attempt_at"),
)
