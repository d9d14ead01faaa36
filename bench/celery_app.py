"""The Celery side of the benchmark: one no-op task, chained three times.

Configured for the same durability as aiso on the wire: quorum queue, persistent messages,
publisher confirms, acknowledgement after the task ran (``task_acks_late``). Completion is
learnt through the ``rpc://`` result backend (a reply queue per client). The worker::

    BENCH_AMQP_URL=amqp://… celery -A bench.celery_app worker -P prefork -c 2 -Q bench.noop

``worker_prefetch_multiplier`` stays at Celery's default (4, so 8 unacknowledged messages for
two worker processes); ``$BENCH_CELERY_PREFETCH_MULTIPLIER`` overrides it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain

__all__ = ["QUEUE", "app", "noop", "pipeline"]

QUEUE = "bench.noop"

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend="rpc://",
)
app.conf.update(
    task_acks_late=True,
    task_default_delivery_mode="persistent",
    task_default_queue=QUEUE,
    task_default_queue_type="quorum",
    broker_transport_options={"confirm_publish": True},
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH_MULTIPLIER", "4")),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="bench.noop")
def noop(payload: dict[str, Any]) -> dict[str, Any]:
    """Returns its payload unchanged."""
    return payload


def pipeline(payload: dict[str, Any]) -> Any:
    """The 3-step chain: noop → noop → noop, each step a separate task message."""
    return chain(noop.s(payload), noop.s(), noop.s())
