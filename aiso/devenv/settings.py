"""Settings for the command line: a malformed ``AISO_*`` variable is one line, not a traceback."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_settings import SettingsError

from aiso.cli.app import fail
from aiso.settings import Settings, get_settings

__all__ = ["load_settings"]


def load_settings() -> Settings:
    """``get_settings()``, or exit 2 naming the variable that is wrong."""
    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "AISO_" + str(first["loc"][0]).upper() if first["loc"] else "AISO_*"
        raise fail(f"{name}: {first['msg']}", 2) from None
    except SettingsError as exc:
        raise fail(f"{exc} (list settings are JSON, e.g. AISO_API_KEYS='[\"key\"]')", 2) from None
