"""``aiso orchestrator``: run one orchestrator process."""

from __future__ import annotations

import typer

from aiso.cli import loop
from aiso.cli.app import app
from aiso.cli.logs import setup_logging
from aiso.devenv.settings import load_settings, store_url_option


@app.command("orchestrator")
def orchestrator(
    database_url: str = typer.Option(None, help="Task store URL (default: AISO_DATABASE_URL)."),
    amqp_url: str = typer.Option(None, help="RabbitMQ URL (default: AISO_AMQP_URL)."),
) -> None:
    """Run the worker-orchestrator: start tasks, apply results, fire timers."""
    from aiso.orchestrator import run

    settings = load_settings()
    updates = {"database_url": store_url_option(database_url, settings)}
    if amqp_url:
        updates["amqp_url"] = amqp_url
    settings = settings.model_copy(update=updates)
    setup_logging("orchestrator")
    loop.run(run(settings))


__all__ = ["orchestrator"]
