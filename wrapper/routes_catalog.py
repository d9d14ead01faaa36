"""``/v1/pipelines`` and ``/v1/services``: what can be run, and whether it can run now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from .auth import principal
from .gateway import Gateway, get_gateway
from .overview import service_views
from .problems import ProblemError, problem_responses
from .schemas import PipelineView, ServiceView

__all__ = ["router"]

router = APIRouter(
    prefix="/v1",
    tags=["catalog"],
    dependencies=[Depends(principal)],
    responses=problem_responses(401),
)

GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _pipeline(gateway: Gateway, name: str) -> PipelineView | None:
    state = gateway.registry.pipeline(name)
    if state is None:
        return None
    return PipelineView.of(state, gateway.registry.catalog())


@router.get("/pipelines", summary="Pipelines and whether they are Ready")
async def list_pipelines(gateway: GatewayDep) -> list[PipelineView]:
    names = sorted(gateway.registry.catalog().pipelines)
    return [view for name in names if (view := _pipeline(gateway, name)) is not None]


@router.get(
    "/pipelines/{name}",
    summary="One pipeline and whether it is Ready",
    responses=problem_responses(404),
)
async def get_pipeline(name: str, gateway: GatewayDep) -> PipelineView:
    view = _pipeline(gateway, name)
    if view is None:
        raise ProblemError(
            404, "pipeline-not-found", f"no pipeline named {name!r}", title="Pipeline not found"
        )
    return view


@router.get(
    "/services", summary="Services: contracts, queues, dead letters, circuit breaker, replicas"
)
async def list_services(gateway: GatewayDep) -> list[ServiceView]:
    return await service_views(gateway)
