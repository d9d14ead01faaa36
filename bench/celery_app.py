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

__all__ = ["QUEUE", "TASK", "app", "make_app", "noop", "pipeline"]

QUEUE = "bench.noop"
TASK = "bench.noop"


def make_app(broker_url: str) -> Celery:
    """A Celery app on ``broker_url`` with the benchmark's settings. The client side makes a
    fresh one per run: an app keeps connections (and thread-local result consumers) to the
    broker it first used, and each run has a vhost of its own."""
    made = Celery("bench", broker=broker_url, backend="rpc://")
    made.conf.update(
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
    return made


app = make_app(os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
"""The worker's app (``celery -A bench.celery_app``)."""


@app.task(name=TASK)
def noop(payload: dict[str, Any]) -> dict[str, Any]:
    """Returns its payload unchanged."""
    return payload


def pipeline(client: Celery, payload: dict[str, Any]) -> Any:
    """The 3-step chain: noop → noop → noop, each step a separate task message."""
    return chain(
        client.signature(TASK, args=(payload,)), client.signature(TASK), client.signature(TASK)
    )
