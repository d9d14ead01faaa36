"""The service runtime: write a handler, declare its contracts, ``aiso service run`` it.

::

    from aiso.sdk import Context, Service
    from aiso.contracts import PayloadType

    service = Service(name="normalize", input=[PayloadType.TEXT], output=PayloadType.TEXT)

    @service.handler
    async def run(payload: dict, params: dict, ctx: Context) -> dict:
        return {"text": payload["text"].strip()}

The runtime consumes ``aiso.svc.<name>``, checks input and output against the declared payload
types, publishes a ``ResultMessage`` per task and acknowledges the task only after the broker
confirmed that result. It serves ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info`` and
``POST /v1/process`` over HTTP, tells the gateways it is alive with a heartbeat every
``AISO_HEARTBEAT_SECONDS``, and on SIGTERM finishes in-flight work before exiting.
Handlers signal failures with ``aiso.errors.PermanentError`` or ``RetryableError``.
"""

from aiso.sdk._context import Context
from aiso.sdk._runtime import Runtime
from aiso.sdk._service import Service

__all__ = ["Context", "Runtime", "Service"]
