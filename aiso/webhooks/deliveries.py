"""Webhook deliveries: written with the task change that causes them, sent until confirmed.

A delivery row is inserted (``Store.schedule_webhook``) in the same transaction as the task's
terminal state (or a step event, when the task asked for progress), so it can neither be lost
nor sent for a change that rolled back. ``WebhookSender`` claims due rows, POSTs them signed
and records the outcome; a 2xx is the receiver's confirmation. Redeliveries back off up to a
horizon, and the state lives in the store, so a restarted sender carries on where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update

from aiso.netguard import UnsafeURL, check_url
from aiso.settings import Settings
from aiso.store import tables as t
from aiso.store.database import Store, as_utc, utcnow
from aiso.webhooks.signing import sign

__all__ = ["WebhookSender"]

log = logging.getLogger("aiso.webhooks")

_LEASE_SECONDS = 60.0  # a claimed row is not claimed again for this long
w = t.webhook_deliveries


class WebhookSender:
    """Delivers due webhooks; any number of processes may run one against the same store."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.client = httpx.AsyncClient(timeout=settings.webhook_timeout_seconds)

    def _backoff(self, attempts: int) -> float:
        delays = self.settings.webhook_backoff_seconds or [1.0]
        return float(delays[min(attempts - 1, len(delays) - 1)])

    async def _claim(self, limit: int = 32) -> list[Any]:
        now = utcnow()
        query = (
            select(w.c.id, w.c.url, w.c.body, w.c.attempts, w.c.created_at)
            .where(w.c.status == "pending", w.c.next_attempt_at <= now)
            .order_by(w.c.next_attempt_at)
            .limit(limit)
        )
        if self.store.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        async with self.store.transaction() as conn:
            rows = (await conn.execute(query)).all()
            if rows:
                await conn.execute(
                    update(w)
                    .where(w.c.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=now + timedelta(seconds=_LEASE_SECONDS))
                )
        return list(rows)

    async def _post(self, row: Any) -> str | None:
        """Send one delivery; None on a 2xx, else what went wrong."""
        secret = self.settings.webhook_secret
        try:
            await check_url(row.url, allow_private=self.settings.allow_private_urls)
        except UnsafeURL as exc:
            return f"refused: {exc}"
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": row.id,
            "webhook-timestamp": str(timestamp),
        }
        if secret is not None:
            headers["webhook-signature"] = sign(
                secret.get_secret_value(), row.id, timestamp, row.body
            )
        try:
            response = await self.client.post(row.url, content=row.body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def _record(self, row: Any, error: str | None) -> None:
        now = utcnow()
        attempts = row.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_error": error}
        created: datetime = as_utc(row.created_at) or now
        horizon = timedelta(seconds=self.settings.webhook_horizon_seconds)
        if error is None:
            values.update(status="delivered", delivered_at=now)
        elif error.startswith("refused") or now - created > horizon:
            values.update(status="abandoned")
            log.warning("webhook %s abandoned after %d attempt(s): %s", row.id, attempts, error)
        else:
            values.update(next_attempt_at=now + timedelta(seconds=self._backoff(attempts)))
        async with self.store.transaction() as conn:
            await conn.execute(update(w).where(w.c.id == row.id).values(**values))

    async def deliver_due(self) -> int:
        """One round: send every due delivery; returns how many were attempted."""
        rows = await self._claim()
        errors = await asyncio.gather(*(self._post(r) for r in rows))
        for row, error in zip(rows, errors, strict=True):
            await self._record(row, error)
        return len(rows)

    async def run(self, interval: float = 0.5) -> None:
        while True:
            try:
                if await self.deliver_due() == 0:
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # store away: the rows wait, nothing is lost
                log.warning("webhook round failed: %s", exc)
                await asyncio.sleep(interval)

    async def close(self) -> None:
        await self.client.aclose()
