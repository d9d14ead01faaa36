"""A service that is broken until a test fixes it, without restarting it.

``AISO_TEST_FAILING_MODE_FILE`` names a file whose content is the behaviour: ``permanent``
(raise ``PermanentError``: the step fails at once and is dead-lettered), ``retryable`` (raise
``RetryableError``: retried, then dead-lettered, and counted by the circuit breaker) or
anything else, or no file, to work (echo the text). The file is read on every call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiso.contracts import PayloadType
from aiso.errors import PermanentError, RetryableError
from aiso.sdk import Context, Service

MODE_FILE_ENV = "AISO_TEST_FAILING_MODE_FILE"

service = Service(name="failing", input=[PayloadType.TEXT], output=PayloadType.TEXT)


def _mode() -> str:
    path = os.environ.get(MODE_FILE_ENV)
    if not path:
        return "ok"
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        return "ok"


@service.handler
async def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    mode = _mode()
    if mode == "permanent":
        raise PermanentError("the model is broken", code="ModelBroken")
    if mode == "retryable":
        raise RetryableError("the model is warming up", code="ModelWarmingUp")
    return {"text": f"fixed: {payload['text']}"}
