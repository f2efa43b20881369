"""The egress gateway: an HTTP proxy on a Unix socket, the only way out of a sandbox with network on.

The VMM forwards the guest's proxy address (10.0.2.100:3128 under QEMU user networking, whose
`restrict=on` drops every other packet) to this socket. Each request names its destination: an
absolute URI with a Host header for HTTP, `CONNECT host:port` for HTTPS and other TCP. The gateway
resolves the name itself, decides by the sandbox's EgressRules, connects only to the addresses it
checked (no second lookup for the guest to race), checks a TLS ClientHello's SNI against the CONNECT
host, and writes every decision to the audit log. Everything read from the guest is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agentkernel.network.dns import Resolver
from agentkernel.network.policy import Decision, EgressRules, IPAddress
from agentkernel.service import audit

MAX_HEAD = 64 * 1024
MAX_CONNECTIONS = 256
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
RESOLVE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive"}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    method: str
    host: str
    port: int
    head: bytes  # what to send upstream (HTTP), empty for CONNECT
    body_length: int


def parse_head(head: bytes) -> Request:
    """Parse a proxy request head (request line and headers, up to the blank line)."""
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise Refused(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise Refused(400, f"unsupported protocol {version[:20]!r}")
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Refused(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    if method == "CONNECT":
        host, port = split_host_port(target, default_port=None)
        return Request(method, host, port, b"", 0)
    if not target.startswith("http://"):
        raise Refused(400, "only absolute http:// URIs and CONNECT are proxied")
    authority, _, path = target[len("http://") :].partition("/")
    host, port = split_host_port(authority, default_port=80)
    host_header = next((v for k, v in headers if k == "host"), None)
    if host_header is not None and split_host_port(host_header, default_port=80) != (host, port):
        raise Refused(400, "Host header does not match the request URI")
    if any(k == "transfer-encoding" for k, _ in headers):
        raise Refused(501, "chunked request bodies are not proxied")
    try:
        length = int(next((v for k, v in headers if k == "content-length"), "0"))
    except ValueError:
        raise Refused(400, "bad Content-Length") from None
    if length < 0:
        raise Refused(400, "bad Content-Length")
    kept = [f"{k}: {v}" for k, v in headers if k not in HOP_HEADERS]
    upstream = "\r\n".join([f"{method} /{path} {version}", *kept, "Connection: close", "", ""])
    return Request(method, host, port, upstream.encode("latin-1"), length)


def split_host_port(value: str, *, default_port: int | None) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = value.partition(":")
    if not port_text:
        if default_port is None:
            raise Refused(400, "CONNECT needs host:port")
        port_text = str(default_port)
    if not host or len(host) > 253 or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Refused(400, f"bad destination {value[:100]!r}")
    return host.lower(), int(port_text)


def tls_sni(data: bytes) -> str | None:
    """The server name of a TLS ClientHello, None if `data` is not one or names no server."""
    try:
        if len(data) < 5 or data[0] != 0x16:
            return None
        pos = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        if data[5] != 0x01:
            return None
        pos += 1 + data[pos]  # session id
        pos += 2 + struct.unpack_from(">H", data, pos)[0]  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = pos + 2 + struct.unpack_from(">H", data, pos)[0]
        pos += 2
        while pos + 4 <= min(end, len(data)):
            ext_type, ext_len = struct.unpack_from(">HH", data, pos)
            pos += 4
            if ext_type == 0:  # server_name: list length, then (type, length, name)
                name_len = struct.unpack_from(">H", data, pos + 3)[0]
                return data[pos + 5 : pos + 5 + name_len].decode("ascii").lower()
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


class Gateway:
    def __init__(self, sandbox: str, rules: EgressRules) -> None:
        self.sandbox = sandbox
        self.rules = rules
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    def _audit(self, req: Request | None, decision: Decision, addresses: Sequence[IPAddress] = ()) -> None:
        audit.record(
            "network",
            self.sandbox,
            method=req.method if req else None,
            host=req.host if req else None,
            port=req.port if req else None,
            addresses=[str(a) for a in addresses],
            allowed=decision.allowed,
            reason=decision.reason,
        )

    def dns_decision(self, name: str, addresses: list[str]) -> bool:
        resolved = [ipaddress.ip_address(a) for a in addresses]
        decision = self.rules.decide(name, resolved)
        self._audit(Request("DNS", name, 53, b"", 0), decision, resolved)
        return decision.allowed

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.slots.locked():
            await _respond(writer, 503, "too many connections")
            return
        async with self.slots:
            req: Request | None = None
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
                req = parse_head(head[:-4])
                addresses = await self._resolve(req.host, req.port)
                decision = self.rules.decide(req.host, addresses)
                self._audit(req, decision, addresses)
                if not decision.allowed:
                    raise Refused(403, decision.reason)
                upstream = await self._connect(addresses, req.port)
                await self._serve(req, reader, writer, upstream)
            except Refused as exc:
                if exc.status != 403:
                    self._audit(req, Decision(False, exc.reason))
                await _respond(writer, exc.status, exc.reason)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                await _respond(writer, 400, "request head missing, too large or too slow")
            except OSError:
                pass
            finally:
                writer.close()

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
            )
        except (OSError, TimeoutError):
            return []
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))

    async def _connect(
        self, addresses: list[IPAddress], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last = "no address"
        for address in addresses:
            try:
                return await asyncio.wait_for(asyncio.open_connection(str(address), port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                last = f"{address}: {exc}"
        raise Refused(502, f"cannot connect: {last}")

    async def _serve(
        self,
        req: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        up_reader, up_writer = upstream
        try:
            if req.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                first = await asyncio.wait_for(reader.read(16384), IDLE_TIMEOUT)
                self._check_sni(req, first)
                up_writer.write(first)
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            else:
                up_writer.write(req.head)
                if req.body_length:
                    await _copy_exactly(reader, up_writer, req.body_length)
                await up_writer.drain()
                await _pipe(up_reader, writer)
        finally:
            up_writer.close()

    def _check_sni(self, req: Request, first: bytes) -> None:
        sni = tls_sni(first)
        if sni is None or sni == req.host:
            return
        try:
            ipaddress.ip_address(req.host)
        except ValueError:
            decision = Decision(False, f"TLS server name {sni[:100]} differs from CONNECT host {req.host}")
        else:
            decision = self.rules.decide(sni, [ipaddress.ip_address(req.host)])
        self._audit(Request("TLS", sni[:253], req.port, b"", 0), decision)
        if not decision.allowed:
            raise OSError(decision.reason)  # the tunnel is already open: just close it


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await asyncio.wait_for(src.read(65536), IDLE_TIMEOUT):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, TimeoutError):
        dst.close()


async def _copy_exactly(src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await asyncio.wait_for(src.read(min(n, 65536)), IDLE_TIMEOUT)
        if not data:
            raise OSError("client closed during the request body")
        dst.write(data)
        await dst.drain()
        n -= len(data)


async def _respond(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    titles = {400: "Bad Request", 403: "Forbidden", 501: "Not Implemented", 502: "Bad Gateway"}
    body = f"agentkernel egress gateway: {reason}\n".encode()
    head = f"HTTP/1.1 {status} {titles.get(status, 'Error')}\r\nContent-Length: {len(body)}\r\n"
    with contextlib.suppress(OSError):
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        await writer.drain()


async def serve(sandbox: str, rules: EgressRules, path: Path, dns_path: Path) -> None:
    gateway = Gateway(sandbox, rules)
    proxy = await asyncio.start_unix_server(
        gateway.handle, path=str(dns_path.with_name(".proxy.tmp")), limit=MAX_HEAD
    )
    resolver = await asyncio.start_unix_server(Resolver(gateway.dns_decision).handle, path=str(dns_path))
    # The proxy socket appears last, under its real name: its existence means both are ready.
    dns_path.with_name(".proxy.tmp").rename(path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    async with proxy, resolver:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="agentkernel egress gateway for one sandbox")
    parser.add_argument("--sandbox", required=True)
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--dns-socket", required=True, type=Path)
    parser.add_argument("--rules", required=True, help="JSON: allow, block, allowlist_only")
    args = parser.parse_args()
    data = json.loads(args.rules)
    rules = EgressRules(tuple(data["allow"]), tuple(data["block"]), bool(data["allowlist_only"]))
    os.umask(0o077)
    asyncio.run(serve(args.sandbox, rules, args.socket, args.dns_socket))


if __name__ == "__main__":
    main()
