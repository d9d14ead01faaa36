"""``/v1/services/{name}/dead-letters``: look at a service's dead letters and replay them.

Operator routes: with API keys configured they need an operator key (a client key gets 403),
since a replay re-runs other clients' tasks. The work is ``aiso.deadletters``'s, shared with
``aiso dead``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from aio_pika.exceptions import AMQPError
from fastapi import APIRouter, Depends, Query

from aiso.deadletters import DeadLetter, NoDeadQueue, ReplayResult, list_dead, replay_dead

from .auth import Principal, principal, require_operator
from .gateway import Gateway, get_gateway
from .problems import ProblemError, problem_responses
from .schemas import ReplayBody

__all__ = ["BROKER_TIMEOUT_SECONDS", "router"]

log = logging.getLogger("aiso.wrapper")

router = APIRouter(
    prefix="/v1/services",
    tags=["operations"],
    dependencies=[Depends(require_operator)],
    responses=problem_responses(401, 403, 404, 503),
)

GatewayDep = Annotated[Gateway, Depends(get_gateway)]
CallerDep = Annotated[Principal | None, Depends(principal)]

BROKER_TIMEOUT_SECONDS = 30.0
"""Longest a listing or replay may take; a broker that slow is answered with 503."""


def _known(gateway: Gateway, name: str) -> None:
    if name not in gateway.registry.catalog().services:
        raise ProblemError(
            404,
            "service-not-found",
            f"no service named {name!r}; GET /v1/services lists them",
            title="Service not found",
        )


def _broker_trouble(exc: BaseException, doing: str) -> ProblemError:
    return ProblemError(
        503,
        "broker-unavailable",
        f"{doing} failed at the broker ({type(exc).__name__}); try again",
        title="Broker unavailable",
    )


@router.get("/{name}/dead-letters", summary="A service's dead letters (they stay in the queue)")
async def get_dead_letters(
    name: str,
    gateway: GatewayDep,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="At most this many, oldest first.")
    ] = 50,
) -> list[DeadLetter]:
    _known(gateway, name)
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_SECONDS):
            return await list_dead(gateway.connection, name, limit)
    except NoDeadQueue:
        return []
    except (AMQPError, ConnectionError, TimeoutError) as exc:
        raise _broker_trouble(exc, "reading the dead-letter queue") from None


@router.post(
    "/{name}/dead-letters/replay",
    summary="Replay dead letters: revive their failed tasks from the failed step",
    description="Messages naming a task and step make the orchestrator re-run that task from "
    "the step; unreadable messages go back to the service queue as they were. Replayed "
    "messages leave the dead queue; the others stay in place.",
    responses=problem_responses(422),
)
async def replay_dead_letters(
    name: str, body: ReplayBody, gateway: GatewayDep, caller: CallerDep
) -> ReplayResult:
    _known(gateway, name)
    selection = None if body.all else body.message_ids
    requested_by = f"gateway:{caller.key_id}" if caller is not None else "gateway"
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_SECONDS):
            result = await replay_dead(
                gateway.connection, name, selection, requested_by=requested_by
            )
    except NoDeadQueue:
        return ReplayResult(replayed=[], not_found=sorted(set(body.message_ids)))
    except (AMQPError, ConnectionError, TimeoutError) as exc:
        # Replays confirmed before the failure stand; the rest stay in the dead queue.
        raise _broker_trouble(exc, "replaying (some messages may have been replayed)") from None
    log.info("%s replayed %d dead letter(s) of %s", requested_by, len(result.replayed), name)
    return result
