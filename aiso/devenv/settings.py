"""Settings for the command line: a malformed ``AISO_*`` variable is one line, not a traceback."""

from __future__ import annotations

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from aiso.cli.app import fail
from aiso.settings import Settings, get_settings, store_url

__all__ = ["invalid_settings", "load_settings", "store_url_option"]


def load_settings() -> Settings:
    """``get_settings()``, or exit 2 naming the variable that is wrong."""
    try:
        return get_settings()
    except ValidationError as exc:
        raise invalid_settings(exc, "AISO_") from None
    except SettingsError as exc:
        raise fail(f"{exc} (list settings are JSON, e.g. AISO_API_KEYS='[\"key\"]')", 2) from None


def invalid_settings(exc: ValidationError, prefix: str) -> typer.Exit:
    """The exit (status 2) for settings read from ``prefix``-ed variables that do not
    validate, with one line naming the first variable that is wrong."""
    first = exc.errors()[0]
    name = prefix + str(first["loc"][0]).upper() if first["loc"] else prefix + "*"
    message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's ValueError prefix
    return fail(f"{name}: {message}", 2)


def store_url_option(given: str | None, settings: Settings) -> str:
    """The store URL of a ``--database-url`` option, or of the settings when it is not given;
    exit 2 saying what is accepted when the option names no database the store runs on."""
    if not given:
        return settings.database_url
    try:
        return store_url(given)
    except ValueError as exc:
        raise fail(f"--database-url: {exc}", 2) from None
