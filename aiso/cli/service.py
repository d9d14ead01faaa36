"""``aiso service …``: run one service replica."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from aiso.cli import loop
from aiso.cli.app import app, fail
from aiso.cli.logs import setup_logging
from aiso.devenv.settings import load_settings
from aiso.sdk import Runtime, Service

__all__ = ["load_service", "service_app"]

service_app = typer.Typer(help="Run AI services.", no_args_is_help=True)
app.add_typer(service_app, name="service")


def load_service(target: str) -> Service:
    """Import ``module:attr`` and check it is a ``Service``; errors are one clear line.

    The current directory is importable, as with uvicorn, so a service next to the caller
    needs no install.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise fail(f"expected MODULE:ATTR (e.g. aiso.services.normalize:service), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise fail(f"no module named {exc.name!r}") from None
        raise fail(f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise fail(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise fail(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, Service):
        raise fail(f"{target} is a {type(obj).__name__}, not an aiso.sdk.Service")
    return obj


@service_app.command("run")
def run(
    target: str = typer.Argument(
        ..., metavar="MODULE:ATTR", help="The Service to run, e.g. aiso.services.normalize:service."
    ),
    port: int | None = typer.Option(
        None, min=0, max=65535, help="HTTP port (default AISO_SERVICE_PORT, 8000)."
    ),
    concurrency: int | None = typer.Option(
        None, min=1, help="Messages handled at once (default: the service's own)."
    ),
) -> None:
    """Consume the service's queue and serve its HTTP API until SIGTERM/SIGINT."""
    service = load_service(target)
    settings = load_settings()
    setup_logging(service.name)
    try:
        runtime = Runtime(service, port=port, concurrency=concurrency, settings=settings)
    except ValueError as exc:  # e.g. the service has no handler
        raise fail(str(exc)) from None
    try:
        loop.run(runtime.run())
    except Exception as exc:  # the port is taken, a startup hook failed: logged already
        raise fail(f"{service.name}: {type(exc).__name__}: {exc}") from None
