"""Circuit breaker per service, kept in the store so every orchestrator shares it.

::

    closed ──N consecutive failures (or failure rate over the window)──▶ open
    open ──resetTimeoutSeconds passed, next dispatch becomes the probe──▶ half_open
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open

While the breaker does not admit a dispatch, the step's attempt waits in the delay tiers (or
takes the step's fallback) instead of piling onto a failing service. Only failures that say
something about the service count: a timeout or a retryable error; bad input does not.
State changes are rare, so the shared row is written on failures and transitions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from aiso.resources import CircuitBreakerPolicy
from aiso.store import Store
from aiso.store import tables as t
from aiso.store.database import as_utc, utcnow

__all__ = ["Admission", "BreakerState", "BreakerWatch", "admit", "record"]

h = t.service_health


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Admission:
    """Whether a dispatch may go now; if not, when to ask again."""

    allowed: bool
    probe: bool = False
    retry_at: datetime | None = None
    state: BreakerState = BreakerState.CLOSED


def _row(store: Store, conn: Connection, service: str) -> Row[Any] | None:
    query = select(h).where(h.c.service == service)
    return conn.execute(store.for_update(query)).first()


def admit(
    conn: Connection,
    store: Store,
    service: str,
    policy: CircuitBreakerPolicy,
    probe_seconds: float,
) -> Admission:
    """Decide a dispatch to ``service``; an open breaker past its cool-down admits one probe."""
    row = _row(store, conn, service)
    if row is None or row.breaker == BreakerState.CLOSED:
        return Admission(True)
    now = utcnow()
    reset = timedelta(seconds=policy.reset_timeout_seconds)
    if row.breaker == BreakerState.OPEN:
        reopen_at = (as_utc(row.opened_at) or now) + reset
        if now < reopen_at:
            return Admission(False, retry_at=reopen_at, state=BreakerState.OPEN)
    else:  # half-open: one probe is out; a lost probe is replaced after its deadline
        probe_until = as_utc(row.probe_until) or now
        if now < probe_until:
            return Admission(False, retry_at=probe_until, state=BreakerState.HALF_OPEN)
    conn.execute(
        update(h)
        .where(h.c.service == service)
        .values(
            breaker=BreakerState.HALF_OPEN.value,
            probe_until=now + timedelta(seconds=probe_seconds),
            updated_at=now,
        )
    )
    return Admission(True, probe=True, state=BreakerState.HALF_OPEN)


def record(
    conn: Connection,
    store: Store,
    service: str,
    policy: CircuitBreakerPolicy,
    *,
    failed: bool,
) -> BreakerState | None:
    """Count one outcome of ``service``; returns the new state when it changed."""
    now = utcnow()
    if not failed and policy.failure_rate_threshold is None:
        # The common case touches nothing: only a breaker with failures on record resets.
        changed = conn.execute(
            update(h)
            .where(h.c.service == service, h.c.consecutive_failures > 0)
            .values(
                breaker=BreakerState.CLOSED.value,
                consecutive_failures=0,
                opened_at=None,
                probe_until=None,
                updated_at=now,
            )
            .returning(h.c.service)
        )
        return BreakerState.CLOSED if changed.first() is not None else None
    row = _row(store, conn, service)
    if row is None:
        conn.execute(
            insert(h).values(
                service=service,
                breaker=BreakerState.CLOSED.value,
                consecutive_failures=0,
                window_started_at=now,
                window_total=0,
                window_failures=0,
                updated_at=now,
            )
        )
        row = _row(store, conn, service)
    assert row is not None
    state = BreakerState(row.breaker)
    failures = row.consecutive_failures + 1 if failed else 0
    window_start = as_utc(row.window_started_at) or now
    total, bad = row.window_total + 1, row.window_failures + int(failed)
    if now - window_start > timedelta(seconds=policy.window_seconds):
        window_start, total, bad = now, 1, int(failed)
    trips = failed and (
        failures >= policy.failure_threshold
        or (
            policy.failure_rate_threshold is not None
            and total >= policy.failure_threshold
            and bad / total >= policy.failure_rate_threshold
        )
    )
    if not failed:
        new_state = BreakerState.CLOSED
    elif trips or state is BreakerState.HALF_OPEN:
        new_state = BreakerState.OPEN
    else:
        new_state = state
    values: dict[str, object] = {
        "consecutive_failures": failures,
        "window_started_at": window_start,
        "window_total": total,
        "window_failures": bad,
        "breaker": new_state.value,
        "updated_at": now,
    }
    if new_state is BreakerState.OPEN and state is not BreakerState.OPEN:
        values.update(opened_at=now, probe_until=None)
    if new_state is BreakerState.CLOSED:
        values.update(opened_at=None, probe_until=None)
    conn.execute(update(h).where(h.c.service == service).values(**values))
    return new_state if new_state is not state else None


class BreakerWatch:
    """Which services have a breaker worth asking about: open, half-open or with failures.

    Most dispatches and results concern healthy services; skipping the shared row for them
    keeps the breaker off the hot path. The set is refreshed from the store every second, so
    another orchestrator's trip is seen within that second; this process's own trips at once.
    """

    def __init__(self) -> None:
        self.hot: set[str] = set()

    def needs_check(self, service: str, policy: CircuitBreakerPolicy) -> bool:
        return service in self.hot or policy.failure_rate_threshold is not None

    def mark(self, service: str) -> None:
        self.hot.add(service)

    async def refresh(self, store: Store) -> None:
        query = select(h.c.service).where(
            (h.c.breaker != BreakerState.CLOSED.value) | (h.c.consecutive_failures > 0)
        )
        async with store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        self.hot = {r.service for r in rows}
