"""``aiso wrapper``: serve the REST gateway."""

from __future__ import annotations

from pathlib import Path

import typer

from aiso.cli.app import app, fail
from aiso.cli.logs import setup_logging
from aiso.devenv.settings import load_settings

__all__ = ["wrapper"]


@app.command("wrapper")
def wrapper(
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 in a container."),
    port: int = typer.Option(8080, min=0, max=65535, help="TCP port to listen on."),
    manifests: Path | None = typer.Option(
        None, help="AIService/Pipeline YAML file or directory (default: AISO_MANIFESTS)."
    ),
) -> None:
    """Run the gateway: accept tasks over REST, stream their progress, list the catalog."""
    from aiso.wrapper.server import serve

    settings = load_settings()
    if manifests is not None:
        settings = settings.model_copy(update={"manifests": manifests})
    if settings.registry == "files" and not settings.manifests.exists():
        raise fail(f"manifests not found: {settings.manifests} (use --manifests PATH)")
    setup_logging("wrapper")
    serve(settings, host=host, port=port)
