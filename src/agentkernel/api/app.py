"""The HTTP API application and the server that runs it (`agentkernel serve`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from agentkernel import __version__
from agentkernel.api import attach, files, problems, routes
from agentkernel.api.auth import API_KEY_ENV, BearerAuth, check_listen_address
from agentkernel.api.limits import BodyLimit
from agentkernel.service.operations import Operations


def create_app(*, project_dir: Path, api_key: str | None) -> FastAPI:
    """The API; with `api_key`, every route but /health needs `Authorization: Bearer <api_key>`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ops = Operations(project_dir)
        try:
            yield
        finally:
            await app.state.ops.close()

    app = FastAPI(
        title="agentkernel",
        version=__version__,
        summary="Run commands and coding agents in microVM sandboxes.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    problems.install(app)
    for router in (routes.router, files.router, attach.router):
        app.include_router(router)
    app.add_middleware(BodyLimit)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)  # added last: it runs first
    return app


def serve(host: str, port: int, *, project_dir: Path) -> None:
    """Serve the API until interrupted. A non-loopback address needs AGENTKERNEL_API_KEY set."""
    key = os.environ.get(API_KEY_ENV) or None
    check_listen_address(host, key)
    app = create_app(project_dir=project_dir, api_key=key)
    uvicorn.run(app, host=host, port=port, log_level="info")
