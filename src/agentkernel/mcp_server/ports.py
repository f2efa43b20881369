"""The MCP server's tool for reaching a server that listens in a sandbox: `expose_port`.

`port_tools` gives the tool function with its annotations; `server.build_server` registers it like
its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from agentkernel.service.service import SandboxService


class ExposedPort(BaseModel):
    guest_port: int = Field(description="The port in the sandbox.")
    host: str = Field(description="The host address to connect to.")
    port: int = Field(description="The host port to connect to.")
    url: str = Field(description="http://host:port, for a server that speaks HTTP.")


def port_tools(sandboxes: SandboxService) -> list[tuple[Callable[..., Awaitable[Any]], ToolAnnotations]]:
    async def expose_port(
        name: Annotated[str, Field(description="The sandbox's name.")],
        port: Annotated[
            int, Field(ge=1, le=65535, description="The port a server listens on inside the sandbox.")
        ],
    ) -> ExposedPort:
        """Make a server that listens on a port inside a running sandbox reachable from this
        machine: the address (on 127.0.0.1) to connect to. Asking again for the same port gives the
        same address; it lasts until the sandbox stops. Each connection reaches whatever listens on
        the sandbox's 127.0.0.1 at that moment: start the server first (for example with
        start_command), and a connection made while nothing listens is closed at once. Refused when
        the sandbox's security profile forwards no ports (restrictive)."""
        forwarded = await sandboxes.expose_port(name, port)
        return ExposedPort(
            guest_port=forwarded.guest_port,
            host=forwarded.host,
            port=forwarded.port,
            url=f"http://{forwarded.address}",
        )

    hints = ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )
    return [(expose_port, hints)]
