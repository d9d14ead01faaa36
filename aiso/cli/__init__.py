"""``aiso`` command line."""

from __future__ import annotations

from aiso.cli import service as _service  # noqa: F401  (registers commands)
from aiso.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
