"""The HTTP side of a replica: probes, metrics, service info and synchronous calls.

Errors are RFC 9457 problem details (``application/problem+json``): ``type`` stays
``about:blank`` and the machine-readable cause is the ``code`` member, the same code a failed
``ResultMessage`` carries, so a client handles both paths alike. Input problems list the
offending fields in ``errors``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aiso.contracts import PayloadType
from aiso.errors import InvalidPayload
from aiso.sdk._context import Context
from aiso.sdk._executor import Executor, failure
from aiso.sdk._metrics import Metrics
from aiso.sdk._service import Service

__all__ = ["create_app"]

PROBLEM_JSON = "application/problem+json"


class ProcessRequest(BaseModel):
    payload_type: PayloadType
    payload: dict[str, Any]
    parameters: dict[str, Any] = Field(default_factory=dict)


class ProcessResponse(BaseModel):
    payload_type: PayloadType
    payload: dict[str, Any]


class ServiceInfo(BaseModel):
    name: str
    version: str
    description: str
    input: list[PayloadType]
    output: PayloadType
    concurrency: int
    replica: str


def problem(
    status: int,
    detail: str,
    *,
    code: str,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def create_app(
    service: Service,
    executor: Executor,
    metrics: Metrics,
    *,
    concurrency: int,
    replica: str,
    not_ready: Callable[[], str | None],
) -> FastAPI:
    """Build the app; ``not_ready`` returns why the replica cannot take work, or None."""
    app = FastAPI(
        title=f"aiso service {service.name}",
        version=service.version,
        description=service.description,
    )
    info = ServiceInfo(
        name=service.name,
        version=service.version,
        description=service.description,
        input=list(service.input),
        output=service.output,
        concurrency=concurrency,
        replica=replica,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in e["loc"] if p != "body") or "body",
                "message": e["msg"],
            }
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem(422, detail, code="InvalidInput", errors=errors)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive: the process serves requests (liveness probe)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready: startup hooks finished and the queue consumer is attached."""
        reason = not_ready()
        if reason is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/info")
    async def service_info() -> ServiceInfo:
        return info

    @app.post(
        "/v1/process",
        response_model=ProcessResponse,
        responses={
            422: {"description": "Invalid input or permanent failure (problem+json)."},
            503: {"description": "Retryable failure or not started yet (problem+json)."},
        },
    )
    async def process(body: ProcessRequest) -> ProcessResponse | JSONResponse:
        """Run the handler once, synchronously: the same code path as a queue message."""
        if not executor.started:
            return problem(503, "startup hooks are still running", code="NotReady")
        call_id = uuid.uuid4()
        ctx = Context(
            task_id=call_id, message_id=call_id, service=service.name, parameters=body.parameters
        )
        try:
            out = await executor.run(body.payload_type, body.payload, ctx)
        except InvalidPayload as exc:
            errors = [{"field": exc.field, "message": str(exc)}]
            return problem(422, str(exc), code="InvalidInput", errors=errors)
        except Exception as exc:
            error = failure(exc, service.name)
            if not error.retryable:
                return problem(422, error.message, code=error.code)
            delay = error.details.get("delay")
            headers = {"Retry-After": str(max(1, round(delay)))} if delay is not None else None
            return problem(503, error.message, code=error.code, headers=headers)
        return ProcessResponse(payload_type=service.output, payload=out)

    return app
