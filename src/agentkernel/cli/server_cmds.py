"""`agentkernel serve` (the HTTP API) and `agentkernel mcp-server` (tools for agents over MCP)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from agentkernel.errors import AgentkernelError

DEFAULT_PORT = 18888
ALLOW_HOSTS_ENV = "AGENTKERNEL_ALLOW_HOSTS"


def serve(
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS", help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, "--port", metavar="PORT", help="Port to listen on."),
    allow_host: list[str] | None = typer.Option(
        None,
        "--allow-host",
        envvar=ALLOW_HOSTS_ENV,
        metavar="NAME[:PORT]",
        help="Another name clients reach the server by, e.g. a reverse proxy's (repeatable; the "
        f"environment variable {ALLOW_HOSTS_ENV} takes them separated by spaces).",
    ),
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json); set AGENTKERNEL_API_KEY to require a key.

    Requests whose Host names another site, and requests from web pages of other origins, are refused.
    """
    from agentkernel.api.app import serve as run_server

    run_server(host, port, project_dir=Path.cwd(), allow_hosts=allow_host or ())


def mcp_server(
    transport: str = typer.Option(
        "stdio", "--transport", metavar="TRANSPORT", help="stdio, or http (streamable HTTP at /mcp)."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="ADDRESS", help="Address for --transport http (loopback only)."
    ),
    port: int = typer.Option(DEFAULT_PORT + 1, "--port", metavar="PORT", help="Port for --transport http."),
    output_limit: int | None = typer.Option(
        None,
        "--output-limit",
        envvar="AGENTKERNEL_MCP_OUTPUT_LIMIT",
        metavar="BYTES",
        help="Bytes of each of a command's stdout and stderr a result shows, as head and tail "
        "(default 16384; a call may ask for another, up to 1 MiB).",
    ),
) -> None:
    """Serve agentkernel's tools to an agent over the Model Context Protocol."""
    from agentkernel.mcp_server.server import run

    if transport not in ("stdio", "http"):
        raise AgentkernelError(f"--transport must be stdio or http (got {transport!r})")
    chosen: Literal["stdio", "http"] = "stdio" if transport == "stdio" else "http"
    run(chosen, host=host, port=port, project_dir=Path.cwd(), output_limit=output_limit)
