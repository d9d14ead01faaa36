"""``aiso orchestrator``: run one orchestrator process."""

from __future__ import annotations

import typer

from aiso.cli import loop
from aiso.cli.app import app
from aiso.cli.logs import setup_logging
from aiso.settings import get_settings


@app.command("orchestrator")
def orchestrator(
    database_url: str = typer.Option(None, help="Task store URL (default: AISO_DATABASE_URL)."),
    amqp_url: str = typer.Option(None, help="RabbitMQ URL (default: AISO_AMQP_URL)."),
) -> None:
    """Run the worker-orchestrator: start tasks, apply results, fire timers."""
    from aiso.orchestrator import run

    settings = get_settings()
    updates = {k: v for k, v in {"database_url": database_url, "amqp_url": amqp_url}.items() if v}
    settings = settings.model_copy(update=updates)
    setup_logging("orchestrator")
    loop.run(run(settings))


__all__ = ["orchestrator"]
