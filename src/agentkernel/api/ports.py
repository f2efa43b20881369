"""Ports of a running sandbox, reached from the host: forward one (`POST`), list those forwarded.

The server's host listens (on 127.0.0.1 unless the request names another address, which the
sandbox's profile must allow) and carries each TCP connection to the port on the guest's loopback.
The answer's `host` is where a client connects: for a listener on every address (0.0.0.0, ::) the
host name the client used to reach this API, so a remote client gets the server's name; a loopback
listener is reachable from the server's own machine only, and `bind` says which address it is.
"""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from agentkernel.api.routes import BODY, Name, Service, problems
from agentkernel.service.ports import ForwardedPort, is_wildcard

router = APIRouter(tags=["ports"], responses=problems(401, 422))


class PortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(description="The TCP port a server listens on in the sandbox (on its loopback).")
    host: str | None = Field(
        None,
        description="The host address to listen on (default 127.0.0.1). Another address (0.0.0.0: "
        'every one) needs a profile with security.ports = "any".',
    )
    host_port: int | None = Field(
        None, description="The host port to listen on (default: the one already forwarded, or a free one)."
    )


class PortView(BaseModel):
    guest_port: int = Field(description="The port in the sandbox.")
    host: str = Field(description="Where a client connects: an address, or this server's host name.")
    port: int = Field(description="The host port.")
    bind: str = Field(description="The address the host listens on (0.0.0.0 or ::: every address).")
    url: str = Field(description="http://host:port, for a server that speaks HTTP.")

    @classmethod
    def of(cls, forwarded: ForwardedPort, request: Request) -> PortView:
        host = forwarded.host
        if is_wildcard(host):
            host = request.url.hostname or host
        shown = f"[{host}]" if _is_ipv6(host) else host
        return cls(
            guest_port=forwarded.guest_port,
            host=host,
            port=forwarded.port,
            bind=forwarded.host,
            url=f"http://{shown}:{forwarded.port}",
        )


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


@router.post("/sandboxes/{name}/ports", responses={**BODY, **problems(403, 404, 409, 502)})
async def expose_port(name: Name, body: PortRequest, sandboxes: Service, request: Request) -> PortView:
    """Reach a port of the sandbox from the host: where to connect. Asking again for a forwarded
    port gives the same address; forwards end when the sandbox stops."""
    forwarded = await sandboxes.expose_port(name, body.port, host=body.host, host_port=body.host_port)
    return PortView.of(forwarded, request)


@router.get("/sandboxes/{name}/ports", responses=problems(404))
async def list_ports(name: Name, sandboxes: Service, request: Request) -> list[PortView]:
    """The sandbox's forwarded ports."""
    return [PortView.of(f, request) for f in await sandboxes.list_ports(name)]
