"""``aiso topology declare`` and ``aiso db upgrade``: the one-off set-up steps on their own.

In a cluster the operator declares queues and a Helm hook migrates the store; these commands
do the same by hand — before a first deploy, after restoring a broker, or from a CI job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from aiso.cli.app import app, fail
from aiso.devenv import broker, store
from aiso.devenv.settings import load_settings, store_url_option
from aiso.errors import ManifestError
from aiso.resources import load_manifests
from aiso.topology import service_queue

__all__ = ["db_upgrade", "topology_declare"]

topology_app = typer.Typer(help="RabbitMQ exchanges and queues.", no_args_is_help=True)
db_app = typer.Typer(help="The task store.", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
app.add_typer(db_app, name="db")


@topology_app.command("declare")
def topology_declare(
    service: list[str] | None = typer.Option(
        None,
        "--service",
        "-s",
        help="Declare this service's queues; repeatable (default: every service in the manifests).",
    ),
    manifests: Path | None = typer.Option(
        None, help="Where the services are listed (default: AISO_MANIFESTS or manifests/)."
    ),
) -> None:
    """Declare the core exchanges and queues, and the services' queues (idempotent)."""
    settings = load_settings()
    names = list(service or [])
    if not names:
        try:
            names = sorted(load_manifests(manifests or settings.manifests).services)
        except ManifestError as exc:
            raise fail(f"{exc} (name services with --service, or use --manifests)", 2) from None
    url = settings.amqp_url
    try:
        asyncio.run(broker.declare_topology(url, names))
    except ValueError as exc:  # an invalid service name
        raise fail(str(exc), 2) from None
    except broker.BrokerError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # every connection or channel error means the same to the user
        raise fail(f"declaring on RabbitMQ at {broker.redact(url)} failed: {exc}") from None
    typer.echo(f"declared the core exchanges and queues on {broker.redact(url)}")
    for name in names:
        typer.echo(f"declared service {name}: queue {service_queue(name)}")


@db_app.command("upgrade")
def db_upgrade(
    database_url: str | None = typer.Option(
        None, help="Task store URL (default: AISO_DATABASE_URL)."
    ),
) -> None:
    """Migrate the task store to the newest schema (idempotent)."""
    url = store_url_option(database_url, load_settings())
    try:
        asyncio.run(store.migrate(url))
    except store.StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"the task store at {store.redact(url)} has the newest schema")
