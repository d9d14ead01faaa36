"""What a handler knows about the call it is serving."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Context"]


class _TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each record with the task and step, so one task's lines can be grepped."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.extra['where'] if self.extra else '-'}] {msg}", kwargs


@dataclass(frozen=True)
class Context:
    """The call a handler serves: which task, step and attempt, and until when.

    ``task_id`` is the task's id through the whole pipeline (stable across retries, handy for
    cache keys or scratch files); ``message_id`` is this dispatch's id. For a synchronous
    ``POST /v1/process`` call both are fresh ids and ``pipeline``/``step`` are None.
    ``deadline`` is when the orchestrator gives up on this attempt: a handler that can stop
    early (long generation, chunked work) should look at it.
    """

    task_id: uuid.UUID
    message_id: uuid.UUID
    service: str
    pipeline: str | None = None
    step: str | None = None
    attempt: int = 1
    deadline: datetime | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """The service's logger, each line tagged with task, step and attempt."""
        where = f"task={self.task_id} step={self.step or '-'} attempt={self.attempt}"
        return _TaskLogger(logging.getLogger(f"aiso.service.{self.service}"), {"where": where})
