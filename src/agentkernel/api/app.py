"""The HTTP API application and the server that runs it (`agentkernel serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.routing import Route

from agentkernel import __version__
from agentkernel.api import attach, commands, dashboard, files, lifecycle, ports, problems, routes
from agentkernel.api.auth import API_KEY_ENV, BearerAuth, check_listen_address
from agentkernel.api.guard import AllowedHosts, WebGuard
from agentkernel.api.limits import BodyLimit
from agentkernel.fleet import mcp as fleet_mcp
from agentkernel.fleet import node as fleet_node
from agentkernel.fleet.node import NodeConfig
from agentkernel.service.lifetimes import DEFAULT_LIFETIME
from agentkernel.service.service import SandboxService, reap_periodically

SHUTDOWN_GRACE = 5
"""Seconds a stopping server lets requests finish; then they are cancelled, removing their sandboxes."""


def create_app(
    *,
    project_dir: Path,
    api_key: str | None,
    hosts: AllowedHosts | None = None,
    node: NodeConfig | None = None,
    default_lifetime: float | None = DEFAULT_LIFETIME,
) -> FastAPI:
    """The API; with `api_key`, every route but /health needs `Authorization: Bearer <api_key>`.
    Sandboxes made through it without a lifetime get `default_lifetime` (None: none).

    Every request, /health included, first passes the Host and Origin check (`hosts`, by default
    loopback names and the address the connection arrived on): a web page never reaches the key check.
    With `node`, the server also registers in the fleet's etcd while it runs (fleet/node.py).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = SandboxService(project_dir)
        reaper = asyncio.create_task(reap_periodically())  # what dead clients and servers left
        tasks = [reaper]
        if node is not None:
            tasks.append(asyncio.create_task(fleet_node.run(node, app.state.service)))
        try:
            async with tools.running() if tools else contextlib.nullcontext():
                yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.service.close()

    app = FastAPI(
        title="agentkernel",
        version=__version__,
        summary="Run commands and coding agents in microVM sandboxes.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.default_lifetime = default_lifetime
    problems.install(app)
    for router in (
        routes.router,
        files.router,
        attach.router,
        commands.router,
        lifecycle.router,
        ports.router,
    ):
        app.include_router(router)
    tools = fleet_mcp.NodeTools(project_dir, default_lifetime) if node is not None else None
    if tools is not None:  # a node serves the MCP tools too, for the fleet's routers (fleet/mcp.py)
        app.router.routes.append(Route("/mcp", tools, methods=["GET", "POST", "DELETE"]))
    dashboard.install(app, api_key)
    app.add_middleware(BodyLimit)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(WebGuard, hosts=hosts or AllowedHosts())  # added last: it runs first
    return app


def serve(
    host: str,
    port: int,
    *,
    project_dir: Path,
    allow_hosts: Sequence[str] = (),
    node: NodeConfig | None = None,
    default_lifetime: float | None = DEFAULT_LIFETIME,
) -> None:
    """Serve the API until interrupted. A non-loopback address needs AGENTKERNEL_API_KEY set;
    `allow_hosts` are more names (`name[:port]`) the Host and Origin headers may use. A fleet `node`
    takes the node key instead of the API key: only the fleet's routers call it."""
    key = fleet_node.node_key(required=node.tls is None) if node else os.environ.get(API_KEY_ENV) or None
    if not (node and node.tls):  # a node with mutual TLS takes only routers with the fleet's certificates
        check_listen_address(host, key)
    hosts = AllowedHosts.configured(host, allow_hosts)
    if node is not None:
        node = fleet_node.with_defaults(node, host, port)
        fleet_node.check_etcd(node)
    app = create_app(
        project_dir=project_dir, api_key=key, hosts=hosts, node=node, default_lifetime=default_lifetime
    )
    tls = node.tls.server_options() if node and node.tls else {}
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE, **tls)
