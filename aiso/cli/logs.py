"""One log format for every aiso process: time, component, level, message."""

from __future__ import annotations

import logging
import os

__all__ = ["setup_logging"]


def setup_logging(component: str) -> None:
    level = os.environ.get("AISO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
    )
    # Connection chatter from the AMQP client is noise at INFO.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
