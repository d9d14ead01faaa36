"""``aiso`` command line."""

from __future__ import annotations

# Each module adds its commands to ``app`` when imported.
from aiso.cli import admin as _admin  # noqa: F401
from aiso.cli import crds as _crds  # noqa: F401
from aiso.cli import dead as _dead  # noqa: F401
from aiso.cli import dev as _dev  # noqa: F401
from aiso.cli import operator as _operator  # noqa: F401
from aiso.cli import orchestrator as _orchestrator  # noqa: F401
from aiso.cli import service as _service  # noqa: F401
from aiso.cli import submit as _submit  # noqa: F401
from aiso.cli import wrapper as _wrapper  # noqa: F401
from aiso.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
