"""`agentkernel serve` (the HTTP API) and `agentkernel mcp-server` (tools for agents over MCP)."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Literal

import typer

from agentkernel.errors import AgentkernelError
from agentkernel.fleet import DEFAULT_TTL, ETCD_ENV
from agentkernel.service.lifetimes import DEFAULT_LIFETIME


def log_to_stderr() -> None:
    """A server's own log (a sandbox that is a container, the reaper's removals) goes to its stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("agentkernel: %(message)s"))
    logger = logging.getLogger("agentkernel")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


DEFAULT_PORT = 18888
ALLOW_HOSTS_ENV = "AGENTKERNEL_ALLOW_HOSTS"
DEFAULT_LIFETIME_OPTION = typer.Option(
    DEFAULT_LIFETIME,
    "--default-lifetime",
    min=0,
    max=30 * 86400,
    metavar="SECONDS",
    help="Lifetime of sandboxes made without one: stopped this long after they start, so one a "
    "client forgets does not run on (0: none).",
)


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
    node: bool = typer.Option(
        False,
        "--node",
        help="Serve as a node of a fleet: register in etcd (needs --etcd and AGENTKERNEL_NODE_KEY).",
    ),
    fleet: bool = typer.Option(
        False,
        "--fleet",
        help="Serve as a router in front of the fleet's nodes (needs --etcd and AGENTKERNEL_NODE_KEY).",
    ),
    etcd: str | None = typer.Option(
        None,
        "--etcd",
        envvar=ETCD_ENV,
        metavar="URL[,URL...]",
        help="Client URLs of the fleet's etcd members.",
    ),
    node_id: str | None = typer.Option(
        None, "--node-id", metavar="NAME", help="This node's name in the fleet (default: the host name)."
    ),
    advertise: str | None = typer.Option(
        None,
        "--advertise",
        metavar="URL",
        help="The URL routers reach this node at (default: http://<listen address>:<port>).",
    ),
    capacity: int | None = typer.Option(
        None,
        "--capacity",
        min=1,
        metavar="N",
        help="Sandboxes this node takes (default: as many of the default size as its memory holds).",
    ),
    lease_ttl: int = typer.Option(
        DEFAULT_TTL,
        "--lease-ttl",
        min=2,
        max=60,
        metavar="SECONDS",
        help="A node that stops renewing its registration for this long is gone, its sandboxes lost.",
    ),
    tls_ca: str | None = typer.Option(
        None, "--tls-ca", metavar="FILE", help="Fleet mTLS: the fleet's CA certificate (PEM)."
    ),
    tls_cert: str | None = typer.Option(
        None,
        "--tls-cert",
        metavar="FILE",
        help="Fleet mTLS: this node's or router's certificate from that CA (`agentkernel fleet certs`).",
    ),
    tls_key: str | None = typer.Option(None, "--tls-key", metavar="FILE", help="Fleet mTLS: its key."),
    default_lifetime: float = DEFAULT_LIFETIME_OPTION,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json); set AGENTKERNEL_API_KEY to require a key.

    Requests whose Host names another site, and requests from web pages of other origins, are refused.
    With --node the server joins a fleet; with --fleet it routes to the fleet's nodes (docs/deploy.md).
    """
    from agentkernel.api.app import serve as run_server

    log_to_stderr()
    if node and fleet:
        raise AgentkernelError("--node and --fleet exclude each other: a server is a node or a router")
    if not (node or fleet):
        if node_id or advertise or capacity:  # not --etcd: its variable may be set for `fleet status`
            raise AgentkernelError("--node-id, --advertise and --capacity need --node")
        if tls_ca or tls_cert or tls_key:
            raise AgentkernelError("--tls-ca, --tls-cert and --tls-key need --node or --fleet")
        run_server(
            host,
            port,
            project_dir=Path.cwd(),
            allow_hosts=allow_host or (),
            default_lifetime=default_lifetime or None,
        )
        return
    from agentkernel.fleet.etcd import parse_urls
    from agentkernel.fleet.node import NodeConfig, check_advertise, check_node_id
    from agentkernel.fleet.tls import TlsFiles

    urls = parse_urls(etcd or "")
    tls = TlsFiles.of(tls_ca, tls_cert, tls_key)
    if fleet:
        from agentkernel.fleet.router import serve as run_router

        run_router(host, port, etcd=urls, allow_hosts=allow_host or (), tls=tls)
        return
    config = NodeConfig(
        id=check_node_id(node_id or socket.gethostname()),
        url=check_advertise(advertise or ""),
        etcd=tuple(urls),
        ttl=lease_ttl,
        capacity=capacity,
        tls=tls,
    )
    run_server(
        host,
        port,
        project_dir=Path.cwd(),
        allow_hosts=allow_host or (),
        node=config,
        default_lifetime=default_lifetime or None,
    )


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
    default_lifetime: float = DEFAULT_LIFETIME_OPTION,
) -> None:
    """Serve agentkernel's tools to an agent over the Model Context Protocol."""
    from agentkernel.mcp_server.server import run

    log_to_stderr()
    if transport not in ("stdio", "http"):
        raise AgentkernelError(f"--transport must be stdio or http (got {transport!r})")
    chosen: Literal["stdio", "http"] = "stdio" if transport == "stdio" else "http"
    run(
        chosen,
        host=host,
        port=port,
        project_dir=Path.cwd(),
        output_limit=output_limit,
        default_lifetime=default_lifetime or None,
    )
