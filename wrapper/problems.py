"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error the gateway answers — its own, FastAPI's request validation, Starlette's routing
404/405, and unhandled exceptions — leaves through here, so a client parses one shape. The
``type`` URI names the problem (``https://aiso.dev/problems/<slug>``); 422 problems list the
offending fields in ``errors`` with dotted paths into the request body (``input.payload.text``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiso.errors import ManifestError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "FieldError",
    "Problem",
    "ProblemError",
    "install_problem_handlers",
    "problem_response",
    "problem_responses",
    "problem_schemas",
]

log = logging.getLogger("aiso.wrapper")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://aiso.dev/problems/"


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. 'input.payload.text'.")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; extension members (``errors``, ``reason``, …) may follow."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="URI naming the problem, e.g. https://aiso.dev/problems/task-not-found."
    )
    title: str = Field(description="Short summary, the same for every occurrence of the type.")
    status: int = Field(description="HTTP status code.")
    detail: str | None = Field(default=None, description="What went wrong this time.")
    instance: str | None = Field(default=None, description="Path of the request that failed.")
    errors: list[FieldError] | None = Field(default=None, description="Invalid fields (422).")


class ProblemError(Exception):
    """Raised by routes to answer with a problem; ``extra`` adds extension members."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = list(errors)
        self.headers = headers
        self.extra = extra


def problem_response(
    status: int,
    slug: str,
    detail: str | None,
    *,
    instance: str | None = None,
    title: str | None = None,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response; used by handlers and by middleware that answers early."""
    problem = Problem(
        type=PROBLEM_BASE + slug,
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        errors=list(errors) or None,
        **extra,
    )
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")
    except ValueError:
        return "http-error"


def _field(loc: Sequence[int | str]) -> str:
    """``("body", "input", "payload", "text")`` → ``input.payload.text``; other locations
    keep their prefix (``query.wait``) so a body field and a parameter never read alike."""
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(
        exc.status,
        exc.slug,
        exc.detail,
        instance=request.url.path,
        title=exc.title,
        errors=exc.errors,
        headers=exc.headers,
        **exc.extra,
    )


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        reason = next(e for e in raw if e.get("type") == "json_invalid")
        detail = (
            f"the body is not valid JSON: {(reason.get('ctx') or {}).get('error', 'malformed')}"
        )
        return problem_response(
            422,
            "malformed-json",
            detail,
            instance=request.url.path,
            title="Malformed JSON",
            errors=[FieldError(field="body", message=detail)],
        )
    errors = [
        FieldError(field=_field(e.get("loc", ())), message=str(e.get("msg", ""))) for e in raw
    ]
    return problem_response(
        422,
        "invalid-request",
        "; ".join(f"{e.field}: {e.message}" for e in errors),
        instance=request.url.path,
        title="Invalid request",
        errors=errors,
    )


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return problem_response(
        exc.status_code,
        _slug(exc.status_code),
        exc.detail,
        instance=request.url.path,
        headers=dict(exc.headers or {}),
    )


async def _on_manifest(request: Request, exc: Exception) -> Response:
    # Broken manifests are an operator's problem, not the client's: say so, but as 503.
    return problem_response(
        503,
        "catalog-unavailable",
        f"the pipeline catalog cannot be read: {exc}",
        instance=request.url.path,
        title="Catalog unavailable",
    )


async def _on_unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500,
        "internal-error",
        "the gateway failed to handle the request; it has been logged",
        instance=request.url.path,
        title="Internal error",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error through problem+json, and document 422s as problems too."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ManifestError, _on_manifest)
    app.add_exception_handler(Exception, _on_unhandled)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _document_problems(schema)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def problem_schemas() -> dict[str, Any]:
    """JSON schemas of ``Problem`` and ``FieldError`` for ``components.schemas``."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {**defs, "Problem": schema}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problems a route may answer with."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


def _document_problems(schema: dict[str, Any]) -> None:
    """Replace FastAPI's default 422 body (never sent here) with the problem schema."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(problem_schemas())
    problem_422 = problem_responses(422)[422]
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if "application/json" in content:
                responses["422"] = problem_422
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
