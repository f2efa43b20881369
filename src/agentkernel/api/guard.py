"""The check that keeps web pages out of agentkernel's HTTP servers (the API and MCP over HTTP).

A browser lets any page send requests to 127.0.0.1, so a server that runs commands must tell a page's
requests from its real clients'. Two attacks need two checks:

- DNS rebinding: a page at http://evil.example re-points its own name to 127.0.0.1 and then talks to
  the server "same-origin". The request still says `Host: evil.example`, so the Host must name this
  server: a loopback name, the address the connection arrived on, the configured listen host, or a name
  the operator allowed (say, a reverse proxy's).
- Cross-site requests (a form POST, a fetch, a WebSocket from any other origin, including another port
  on localhost): the browser says where they come from with `Origin` (and `Sec-Fetch-Site`). An Origin,
  when sent, must be this server itself: http or https, an allowed host, the port it listens on.

Clients that are not browsers (curl, the SDK, MCP clients) send no Origin and pass. The check runs
first, before authentication, on every request and WebSocket handshake, /health included.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from agentkernel.api.problems import Problem, problem, response
from agentkernel.errors import AgentkernelError

log = logging.getLogger("agentkernel.api")

_NAME = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*)"
AUTHORITY = re.compile(rf"({_NAME})(?::([0-9]{{1,5}}))?")
ORIGIN = re.compile(rf"(https?)://({_NAME})(?::([0-9]{{1,5}}))?", re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}
Local = tuple[str, int | None]
"""The address and port a connection arrived on (the ASGI scope's `server`)."""
BROWSER_FETCH_SITES = frozenset({"same-origin", "none"})
"""Sec-Fetch-Site values of requests that do not come from another origin's page."""


def _normal(name: str) -> str:
    """A host name compared case-insensitively, an address in its canonical form (IPv6 unbracketed)."""
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return name.lower()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)


def _authority(text: str) -> tuple[str, int | None] | None:
    """`name[:port]` as (normalized name, port), or None if it is not one."""
    match = AUTHORITY.fullmatch(text)
    if match is None or (match[2] is not None and not 0 < int(match[2]) < 65536):
        return None
    return _normal(match[1]), int(match[2]) if match[2] else None


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AllowedHosts:
    """Which Host and Origin headers a server accepts.

    Always: loopback names (localhost, 127.0.0.0/8, ::1) and the address the connection arrived on
    (a DNS-rebinding request names the attacker's domain, never an address). Also `listen_host` (None
    for a wildcard listen: 0.0.0.0 or ::) and `extra`, (name, port) pairs. A Host may carry any port;
    an Origin must carry the entry's port, or else the port the connection arrived on.
    """

    listen_host: str | None = None
    extra: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def configured(cls, listen_host: str, extra: Sequence[str] = ()) -> AllowedHosts:
        """From the command line: a one-line error for an `extra` entry that is not `name[:port]`."""
        entries = []
        for entry in extra:
            parsed = _authority(entry.strip())
            if parsed is None:
                raise AgentkernelError(
                    f"--allow-host {entry!r}: expected a host name or address with an optional :port "
                    "(e.g. agents.example.com or agents.example.com:443)"
                )
            entries.append(parsed)
        listen = _normal(listen_host)
        try:
            wildcard = ipaddress.ip_address(listen).is_unspecified
        except ValueError:
            wildcard = not listen
        return cls(None if wildcard else listen, tuple(entries))

    def _ports(self, name: str, local_name: str) -> list[int | None]:
        """The ports that go with an allowed `name` (None: the connection's); empty if not allowed."""
        ports = [port for entry, port in self.extra if entry == name]
        if _is_loopback(name) or name in (local_name, self.listen_host):
            ports.append(None)
        return ports

    def host_problem(self, host: str | None, http_version: str, local: Local) -> Problem | None:
        """Why a request with this Host header is refused, or None if it is not."""
        if host is None:
            if http_version == "1.0":
                return None  # HTTP/1.0 has no Host; a browser always sends one
            return problem(400, "missing_host", "the request has no Host header (HTTP/1.1 requires one)")
        parsed = _authority(host)
        if parsed is None:
            return problem(400, "invalid_host", f"the Host header {host!r} is not a host name and port")
        if not self._ports(parsed[0], local[0]):
            return problem(
                421,
                "host_not_allowed",
                f"the Host header {host!r} does not name this server (a web page using DNS rebinding?)",
            )
        return None

    def origin_problem(self, origin: str, local: Local) -> Problem | None:
        """Why a request with this Origin header is refused, or None if it is this server's own."""
        match = ORIGIN.fullmatch(origin)
        if match is not None:
            scheme, name = match[1].lower(), _normal(match[2])
            port = int(match[3]) if match[3] else DEFAULT_PORTS[scheme]
            if port in {local[1] if p is None else p for p in self._ports(name, local[0])}:
                return None
        why = "an opaque origin (a sandboxed page or a local file)" if origin == "null" else "another origin"
        return problem(
            403,
            "origin_not_allowed",
            f"the request comes from a web page on {why} (Origin: {origin!r}); only this server's own "
            "origin may call it from a browser",
        )


class WebGuard:
    """ASGI middleware refusing requests from web pages that are not this server (see the module doc):
    a Host that names another site (421), a foreign or opaque Origin or a cross-site Sec-Fetch-Site
    (403). WebSocket handshakes are refused before they are accepted."""

    def __init__(self, app: ASGIApp, hosts: AllowedHosts) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused %s %s: %s", scope.get("method", "WEBSOCKET"), scope["path"], refusal.detail)
        await deny(scope, receive, send, refusal)

    def check(self, scope: Scope) -> Problem | None:
        """Why this request or WebSocket handshake is refused, or None."""
        seen: dict[bytes, list[str]] = {b"host": [], b"origin": [], b"sec-fetch-site": []}
        for key, value in scope["headers"]:
            if key in seen:
                seen[key].append(value.decode("latin-1"))
        if len(seen[b"host"]) > 1 or len(seen[b"origin"]) > 1:
            return problem(400, "duplicate_header", "the request has more than one Host or Origin header")
        server = scope.get("server") or ("", None)
        local: Local = (_normal(str(server[0])), server[1])
        host, origin, site = (next(iter(seen[key]), None) for key in seen)
        refusal = self.hosts.host_problem(host, scope.get("http_version", "1.1"), local)
        if refusal is None and origin is not None:
            refusal = self.hosts.origin_problem(origin, local)
        if refusal is None and site is not None and site.lower() not in BROWSER_FETCH_SITES:
            refusal = problem(
                403,
                "origin_not_allowed",
                f"the request comes from a web page on another origin (Sec-Fetch-Site: {site!r})",
            )
        return refusal


async def deny(
    scope: Scope, receive: Receive, send: Send, refusal: Problem, headers: dict[str, str] | None = None
) -> None:
    """Answer with the problem; a WebSocket handshake that cannot carry an HTTP answer is closed (1008)."""
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await response(refusal, headers=headers)(scope, receive, send)
