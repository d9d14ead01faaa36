"""Serving the gateway with uvicorn, with a shutdown that does not wait on open streams.

Event streams and ``?wait=`` requests only end when their task does, so uvicorn's graceful
shutdown would sit out its whole timeout on them and then cancel them mid-response. Here,
shutdown first closes the event hub: streams end cleanly, waits answer with the task as it is,
and clients carry on against another replica (``Last-Event-ID``, ``GET /v1/tasks/{id}``).
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from aiso.settings import Settings

from .app import create_app
from .gateway import Gateway

__all__ = ["SHUTDOWN_GRACE_SECONDS", "serve"]

SHUTDOWN_GRACE_SECONDS = 10
"""After SIGTERM, how long requests in flight may take to finish before they are cut."""


class _GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        gateway: Gateway | None = getattr(self._app.state, "gateway", None)
        if gateway is not None:
            gateway.hub.close()
        await super().shutdown(sockets)


def serve(settings: Settings, *, host: str, port: int) -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep the process's logging set-up
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
    _GatewayServer(config, app).run()
