"""`agentkernel serve` (the HTTP API) and `agentkernel mcp-server` (tools for agents over MCP)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from agentkernel.errors import AgentkernelError

DEFAULT_PORT = 18888


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on."),
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json); set AGENTKERNEL_API_KEY to require a key."""
    from agentkernel.api.app import serve as run_server

    run_server(host, port, project_dir=Path.cwd())


def mcp_server(
    transport: str = typer.Option("stdio", "--transport", help="stdio, or http (streamable HTTP at /mcp)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address for --transport http (loopback only)."),
    port: int = typer.Option(DEFAULT_PORT + 1, "--port", help="Port for --transport http."),
) -> None:
    """Serve agentkernel's tools to an agent over the Model Context Protocol."""
    from agentkernel.mcp_server.server import run

    if transport not in ("stdio", "http"):
        raise AgentkernelError(f"--transport must be stdio or http (got {transport!r})")
    chosen: Literal["stdio", "http"] = "stdio" if transport == "stdio" else "http"
    run(chosen, host=host, port=port, project_dir=Path.cwd())
