"""``aiso dead list`` and ``aiso dead replay``: a service's dead letters, straight from RabbitMQ.

For operators with broker access (the gateway offers the same over REST to operator keys).
Listing takes nothing out of the queue; a replay asks the orchestrator to re-run each failed
task from its failed step — run it once the service is fixed. With ``--orchestrator`` both
work on the messages the orchestrator parked instead, and a replay sends each back where it
was headed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
import typer
from aio_pika.abc import AbstractConnection

from aiso.cli.app import app, fail
from aiso.deadletters import (
    DeadLetter,
    NoDeadQueue,
    ReplayResult,
    list_dead,
    list_parked,
    replay_dead,
    replay_parked,
)
from aiso.devenv.broker import redact
from aiso.devenv.settings import load_settings

__all__ = ["dead_app", "dead_list", "dead_replay", "dead_table"]

dead_app = typer.Typer(
    help="Dead-letter queues: steps that failed for good and unreadable messages.",
    no_args_is_help=True,
)
app.add_typer(dead_app, name="dead")

_T = TypeVar("_T")


def _on_broker(work: Callable[[AbstractConnection], Awaitable[_T]], hint: str = "") -> _T:
    """Run ``work`` on a connection to ``AISO_AMQP_URL``; failures end as one line (``hint``
    follows the one saying the dead queue does not exist)."""
    url = load_settings().amqp_url

    async def run() -> _T:
        connection = await aio_pika.connect(url)
        try:
            return await work(connection)
        finally:
            await connection.close()

    try:
        return asyncio.run(run())
    except NoDeadQueue as exc:
        raise fail(f"{exc}{hint}") from None
    except Exception as exc:  # every connection or channel error means the same to the user
        raise fail(f"RabbitMQ at {redact(url)}: {type(exc).__name__}: {exc}") from None


def dead_table(letters: list[DeadLetter]) -> list[str]:
    """Plain aligned columns, reason last: ids are never wrapped or cut, so they can be copied
    into ``aiso dead replay`` and the lines grepped."""
    rows = [("MESSAGE ID", "TASK", "STEP", "ATTEMPTS", "SIZE", "REASON")]
    for letter in letters:
        reason = letter.reason
        if letter.first_death_reason and letter.first_death_reason not in reason:
            reason += f" (broker: {letter.first_death_reason})"
        rows.append(
            (
                letter.message_id,
                letter.task_id or "-",
                letter.step or "-",
                str(len(letter.attempts)) if letter.attempts else "-",
                str(letter.size),
                reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


_NAME_HINT = " (is the service name right?)"
_ORCHESTRATOR_HELP = (
    "The messages the orchestrator parked (aiso.orchestrator.dead) instead of a service's."
)


@dead_app.command("list")
def dead_list(
    service: str | None = typer.Argument(None, help="The service whose dead letters to show."),
    limit: int = typer.Option(50, min=1, help="At most this many, oldest first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array instead of a table."),
    orchestrator: bool = typer.Option(False, "--orchestrator", help=_ORCHESTRATOR_HELP),
) -> None:
    """Show a service's dead letters (with --orchestrator: the messages the orchestrator
    parked); they stay in the queue."""
    if orchestrator == (service is not None):
        raise fail("give either a service or --orchestrator", 2)
    if service is None:
        letters = _on_broker(lambda connection: list_parked(connection, limit))
        where = "the orchestrator"
    else:
        letters = _on_broker(lambda connection: list_dead(connection, service, limit), _NAME_HINT)
        where = service
    if as_json:
        typer.echo(json.dumps([letter.model_dump(mode="json") for letter in letters], indent=2))
    elif not letters:
        typer.echo(f"no dead letters for {where}")
    else:
        typer.echo("\n".join(dead_table(letters)))


@dead_app.command("replay")
def dead_replay(
    service: str | None = typer.Argument(
        None, help="The service whose dead letters to replay (with --orchestrator: an id)."
    ),
    message_ids: list[str] | None = typer.Argument(
        None, metavar="[MESSAGE-ID]...", help="Replay these (ids from `aiso dead list`)."
    ),
    replay_all: bool = typer.Option(False, "--all", help="Replay every dead letter."),
    orchestrator: bool = typer.Option(False, "--orchestrator", help=_ORCHESTRATOR_HELP),
) -> None:
    """Re-run the failed tasks of dead letters from their failed step; replayed messages leave
    the dead queue, the others stay. With --orchestrator, send parked messages back where
    they were headed."""
    ids = list(message_ids or [])
    if orchestrator and service is not None:
        ids.insert(0, service)  # there is no service: every argument is a message id
    if not orchestrator and service is None:
        raise fail("give a service, or --orchestrator", 2)
    if replay_all == bool(ids):
        raise fail("give either --all or one or more message ids", 2)
    selection = None if replay_all else ids
    result: ReplayResult
    if orchestrator:
        where = "the orchestrator"
        result = _on_broker(lambda connection: replay_parked(connection, selection))
    else:
        assert service is not None
        where = service
        result = _on_broker(
            lambda connection: replay_dead(
                connection, service, selection, requested_by="aiso dead replay"
            ),
            _NAME_HINT,
        )
    for item in result.replayed:
        if item.action == "replay":
            typer.echo(f"{item.message_id}: task {item.task_id} replays from step {item.step}")
        else:
            typer.echo(f"{item.message_id}: sent back where it was headed, as it was")
    typer.echo(f"{len(result.replayed)} dead letter(s) of {where} replayed")
    if result.not_found:
        raise fail("not in the dead queue: " + ", ".join(result.not_found))
