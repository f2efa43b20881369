"""`agentkernel port SANDBOX [GUEST_PORT]` and the `-p` of `run`: reach a server that listens in a
sandbox from the host, docker-like."""

from __future__ import annotations

import json

import typer

from agentkernel.cli.output import err_console, print_json
from agentkernel.cli.sandbox_cmds import with_service
from agentkernel.errors import InvalidRequestError
from agentkernel.service.ports import ForwardedPort
from agentkernel.service.service import SandboxService

Publish = tuple[str | None, int | None, int]
"""What a `-p` asks for: host address (None: 127.0.0.1), host port (None: a free one), guest port."""


def parse_publish(spec: str) -> Publish:
    """`[HOST_IP:][HOST_PORT:]GUEST_PORT` as docker spells it (an IPv6 HOST_IP in brackets; an empty
    HOST_PORT, as in `127.0.0.1::80`, is a free one)."""
    host: str | None = None
    rest = spec
    if spec.startswith("["):
        close = spec.find("]:")
        if close < 0:
            raise InvalidRequestError("publish", f"{spec!r}: an IPv6 address ends with ']:'")
        host, rest = spec[1:close], spec[close + 2 :]
    parts = rest.split(":")
    if host is None and len(parts) == 3:
        host, parts = parts[0], parts[1:]
    if (
        not 1 <= len(parts) <= 2
        or not all(p.isdigit() for p in parts[-1:])
        or (len(parts) == 2 and parts[0] and not parts[0].isdigit())
    ):
        raise InvalidRequestError(
            "publish", f"{spec!r}: use [HOST_IP:][HOST_PORT:]GUEST_PORT, like 8080:80 or 127.0.0.1:8080:80"
        )
    host_port = int(parts[0]) if len(parts) == 2 and parts[0] else None
    return host or None, host_port, int(parts[-1])


async def publish_all(service: SandboxService, name: str, specs: list[Publish]) -> list[ForwardedPort]:
    """Forward each `-p` of `run`; those whose host port was left to the host are told on stderr."""
    done = []
    for host, host_port, guest_port in specs:
        forwarded = await service.expose_port(name, guest_port, host=host, host_port=host_port)
        if not host_port:
            err_console.print(f"agentkernel: guest port {guest_port} is at {forwarded.address}")
        done.append(forwarded)
    return done


def port(
    name: str = typer.Argument(..., metavar="SANDBOX", help="The sandbox's name."),
    guest_port: int | None = typer.Argument(
        None, metavar="GUEST_PORT", help="A port a server listens on in the sandbox (none: list them)."
    ),
    bind: str | None = typer.Option(
        None,
        "--bind",
        metavar="ADDRESS",
        help='Host address to listen on (default 127.0.0.1; others need security.ports = "any").',
    ),
    host_port: int | None = typer.Option(
        None, "--host-port", metavar="PORT", help="Host port to listen on (default: a free one)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print the host address where a sandbox's port is reached, forwarding it on first use.

    The forward lasts until the sandbox stops. Without GUEST_PORT, list the forwarded ports."""
    if guest_port is None:
        listed = with_service(lambda service: service.list_ports(name))
        if json_out:
            print_json([f.record() for f in listed])
        for f in [] if json_out else listed:
            typer.echo(f"{f.guest_port} -> {f.address}")
        return
    forwarded = with_service(
        lambda service: service.expose_port(name, guest_port, host=bind, host_port=host_port)
    )
    typer.echo(json.dumps(forwarded.record()) if json_out else forwarded.address)
