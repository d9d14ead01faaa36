"""Errors that decide what happens next.

::

    AisoError
    ├── InvalidMessage        a message fails its contract → dead-lettered, never retried
    ├── InvalidPayload        a payload fails its payload-type schema (``field`` names where)
    ├── ManifestError         an AIService/Pipeline manifest is malformed or inconsistent
    ├── TaskError             raised by service handlers
    │   ├── RetryableError    worth another attempt (after ``delay`` seconds, if given)
    │   └── PermanentError    will fail again the same way: the step fails now
    └── NotFound              a pipeline, service or task does not exist

Any other exception escaping a handler counts as retryable: a bug that a retry cannot fix still
ends once ``maxAttempts`` is reached, while a flaky dependency gets its retry.
"""

from __future__ import annotations

__all__ = [
    "AisoError",
    "InvalidMessage",
    "InvalidPayload",
    "ManifestError",
    "NotFound",
    "PermanentError",
    "RetryableError",
    "TaskError",
]


class AisoError(Exception):
    """Base of every aiso error."""


class InvalidMessage(AisoError):
    """A message does not match its contract; it is dead-lettered with this reason."""


class InvalidPayload(AisoError):
    """A payload does not match the schema of its payload type."""

    def __init__(self, message: str, *, field: str = "payload") -> None:
        super().__init__(message)
        self.field = field


class ManifestError(AisoError):
    """A manifest cannot be loaded or is inconsistent."""


class NotFound(AisoError):
    """A named object does not exist."""


class TaskError(AisoError):
    """Raised by a service handler; ``code`` is reported to the client."""

    retryable: bool = True

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or type(self).__name__


class RetryableError(TaskError):
    """A transient failure: the orchestrator schedules another attempt."""

    retryable = True

    def __init__(self, message: str, *, code: str | None = None, delay: float | None = None):
        super().__init__(message, code=code)
        self.delay = delay


class PermanentError(TaskError):
    """A failure that will repeat (bad input, unsupported format): no retry."""

    retryable = False
