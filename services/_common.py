"""Checks shared by the reference services: parameters, text input, limits from the environment.

Every check raises ``PermanentError``. A bad parameter, an empty text or one over the limit
fails the same way on every attempt, so the step fails at once with a message naming the
problem instead of going through the retry tiers. Unknown parameter names are refused too: a
typo (``sentence`` for ``sentences``) must not silently fall back to the default.

Limits are read from ``AISO_<SERVICE>_*`` environment variables when the module loads, so an
operator sets them in the AIService ``env``; a client cannot raise them per request.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from aiso.errors import PermanentError

__all__ = [
    "MAX_TEXT_CHARS",
    "check_params",
    "env_number",
    "int_param",
    "str_param",
    "text_of",
]

MAX_TEXT_CHARS = 100_000
"""Default longest text the text services take (about 15,000 words, a long report)."""


def env_number(name: str, default: float) -> float:
    """A positive number from the environment; a malformed value stops the process at start."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def check_params(params: Mapping[str, Any], accepted: Collection[str]) -> None:
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        names = ", ".join(sorted(accepted)) or "none"
        raise PermanentError(
            f"unknown parameter(s) {', '.join(unknown)} (accepted: {names})",
            code="InvalidParameter",
        )


def int_param(params: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within ``[low, high]``; ``3.0`` is taken as 3, ``true`` is not."""
    value = params.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PermanentError(
            f"parameter '{name}' must be an integer from {low} to {high}, got {value!r}",
            code="InvalidParameter",
        )
    return value


def str_param(params: Mapping[str, Any], name: str, default: str) -> str:
    value = params.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise PermanentError(
            f"parameter '{name}' must be a non-empty string, got {value!r}",
            code="InvalidParameter",
        )
    return value.strip()


def text_of(payload: Mapping[str, Any], *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The payload's text, refused when blank or longer than ``max_chars`` characters."""
    text = str(payload.get("text", ""))
    if not text.strip():
        raise PermanentError("empty text: the payload's 'text' has no content", code="EmptyText")
    if len(text) > max_chars:
        raise PermanentError(
            f"text too long: {len(text)} characters, the limit is {max_chars}",
            code="TextTooLong",
        )
    return text
