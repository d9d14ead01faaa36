"""Bearer API keys: who may call ``/v1/*``, and who may run the operator routes.

Keys come from settings as ``sha256:<hex>`` digests or plain keys; only their SHA-256 digests
are kept, so a memory dump or a log line never holds a usable key, and the Secret can hold
digests instead of keys. A presented key is hashed and compared with every digest using
``hmac.compare_digest``, so timing tells nothing about how close a guess was.

``BearerAuth`` runs before the body is read: an unauthenticated caller gets 401 without the
gateway buffering or parsing anything, and learns nothing about which ``/v1`` routes exist.
Probes, metrics and the API documentation stay open. With no key configured (``aiso dev``)
every route is open.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from aiso.settings import Settings

from .problems import ProblemError, problem_response

__all__ = [
    "PROTECTED_PREFIX",
    "BearerAuth",
    "KeyRing",
    "Principal",
    "Role",
    "bearer_scheme",
    "principal",
    "require_operator",
]

PROTECTED_PREFIX = "/v1/"
"""Every API route lives under it; ``/healthz``, ``/readyz``, ``/metrics`` and ``/docs`` do not."""

_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_STATE_KEY = "aiso_principal"

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key from AISO_API_KEYS (clients) or AISO_ADMIN_API_KEYS (operators).",
)
"""Documents the scheme in OpenAPI; ``BearerAuth`` does the checking."""


class Role(StrEnum):
    CLIENT = "client"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``key_id`` (a digest prefix) scopes its idempotency keys and
    may appear in logs; the key itself never does."""

    role: Role
    key_id: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _load(entries: Iterable[SecretStr], setting: str) -> tuple[bytes, ...]:
    digests = []
    for i, entry in enumerate(entries):
        value = entry.get_secret_value().strip()
        if not value:
            raise ValueError(f"{setting}[{i}] is empty")
        if value.startswith("sha256:"):
            match = _DIGEST.match(value)
            if match is None:
                # Name the entry, never echo it: it may be a mistyped real key.
                raise ValueError(f"{setting}[{i}]: 'sha256:' must be followed by 64 hex digits")
            digests.append(bytes.fromhex(match.group(1)))
        else:
            digests.append(_digest(value))
    return tuple(digests)


class KeyRing:
    """The digests of the configured keys, and the check of a presented one."""

    def __init__(self, client: Iterable[SecretStr], operator: Iterable[SecretStr]) -> None:
        self._client = _load(client, "api_keys")
        self._operator = _load(operator, "admin_api_keys")

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        return cls(settings.api_keys, settings.admin_api_keys)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured, i.e. whether ``/v1/*`` needs one."""
        return bool(self._client or self._operator)

    def identify(self, key: str) -> Principal | None:
        """The caller holding ``key``, or None. Operator keys are checked first, so a key
        configured in both lists gets the wider role."""
        digest = _digest(key)
        for role, digests in ((Role.OPERATOR, self._operator), (Role.CLIENT, self._client)):
            # Compare with every digest, not until the first match: no early exit to time.
            matches = [hmac.compare_digest(digest, known) for known in digests]
            if any(matches):
                return Principal(role=role, key_id=digest.hex()[:16])
        return None


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token
            return None
    return None


class BearerAuth:
    """ASGI middleware: ``/v1/*`` requests need a known key once any key is configured.

    The caller is stored in the request's state for the routes (``principal``).
    """

    def __init__(self, app: ASGIApp, *, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys.enabled
            or not scope["path"].startswith(PROTECTED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        caller = self.keys.identify(token) if token is not None else None
        if caller is None:
            detail = (
                "this API needs 'Authorization: Bearer <api key>'"
                if token is None
                else "the API key is not valid"
            )
            response = problem_response(
                401,
                "unauthorized",
                detail,
                instance=scope["path"],
                title="Unauthorized",
                headers=_CHALLENGE,
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[_STATE_KEY] = caller
        await self.app(scope, receive, send)


async def principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal | None:
    """FastAPI dependency: the authenticated caller, or None when no key is configured.
    (``async`` like every dependency here: FastAPI runs a plain function on a worker
    thread, a measurable cost per request.)"""
    caller: Principal | None = request.scope.get("state", {}).get(_STATE_KEY)
    return caller


async def require_operator(caller: Annotated[Principal | None, Depends(principal)]) -> None:
    """FastAPI dependency of the operator routes: a client key is refused with 403."""
    if caller is not None and caller.role is not Role.OPERATOR:
        raise ProblemError(
            403,
            "forbidden",
            "this route needs an operator key (AISO_ADMIN_API_KEYS); a client key is not enough",
            title="Forbidden",
        )
