"""The egress gateway on a real Unix socket, in front of real servers on loopback."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agentkernel.network.gateway import Gateway, Refused, parse_head, tls_sni
from agentkernel.network.policy import EgressRules
from agentkernel.service import audit


@asynccontextmanager
async def http_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b"hello from " + head.split(b" ")[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@asynccontextmanager
async def gateway(tmp_path: Path, rules: EgressRules) -> AsyncIterator[Path]:
    sock = tmp_path / "gw.sock"
    server = await asyncio.start_unix_server(Gateway("gwtest", rules).handle, path=str(sock), limit=65536)
    async with server:
        yield sock


def get(port: int, path: str) -> bytes:
    return f"GET http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def ask(sock: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))  # type: ignore[arg-type]


def audit_entries() -> list[dict[str, object]]:
    return [e for e in audit.entries("gwtest") if e["event"] == "network"]


def test_host_loopback_refused_by_default_and_audited(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with http_server() as port, gateway(tmp_path, EgressRules()) as sock:
            answer = await ask(
                sock, f"GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            )
            assert answer.startswith(b"HTTP/1.1 403")
            assert b"host-local" in answer

    run(body)
    (entry,) = audit_entries()
    assert entry["allowed"] is False and entry["host"] == "127.0.0.1"


def test_explicitly_allowed_loopback_server_is_reachable(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with http_server() as port, gateway(tmp_path, EgressRules(allow=("127.0.0.1",))) as sock:
            answer = await ask(
                sock, f"GET http://127.0.0.1:{port}/path HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            )
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from /path")
            tunnel = await ask(
                sock,
                f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode() + b"GET /tunneled HTTP/1.1\r\n\r\n",
            )
            assert tunnel.startswith(b"HTTP/1.1 200 Connection established") and tunnel.endswith(b"/tunneled")

    run(body)
    assert all(e["allowed"] for e in audit_entries())


def test_metadata_address_and_blocked_domain(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with gateway(tmp_path, EgressRules(block=("localhost",))) as sock:
            meta = await ask(sock, b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n\r\n")
            assert meta.startswith(b"HTTP/1.1 403")
            blocked = await ask(sock, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
            assert blocked.startswith(b"HTTP/1.1 403") and b"block" in blocked

    run(body)
    reasons = [e["reason"] for e in audit_entries()]
    assert any("host-local" in str(r) for r in reasons)
    assert any("blocked by" in str(r) for r in reasons)


def test_sni_must_match_connect_host(isolated_home: Path, tmp_path: Path) -> None:
    hello = client_hello("evil.example")
    assert tls_sni(hello) == "evil.example"

    async def body() -> None:
        async with (
            http_server() as port,
            gateway(tmp_path, EgressRules(allow=("localhost",))) as sock,
        ):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode() + hello)
            data = await asyncio.wait_for(reader.read(), 10)
            assert data == b"HTTP/1.1 200 Connection established\r\n\r\n"  # then closed: no relay

    run(body)
    assert any(e["method"] == "TLS" and e["allowed"] is False for e in audit_entries())


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET /relative HTTP/1.1\r\n\r\n",
        b"CONNECT nohostport HTTP/1.1\r\n\r\n",
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
        b"POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_malformed_requests(isolated_home: Path, tmp_path: Path, request_bytes: bytes) -> None:
    async def body() -> None:
        async with gateway(tmp_path, EgressRules()) as sock:
            answer = await ask(sock, request_bytes)
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 501"))

    run(body)


def test_oversized_head_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with gateway(tmp_path, EgressRules()) as sock:
            answer = await ask(sock, b"GET http://a.example/ HTTP/1.1\r\nX: " + b"a" * 200_000 + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400")

    run(body)


def test_parse_head_strips_hop_headers() -> None:
    req = parse_head(
        b"GET http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\nProxy-Connection: keep-alive"
    )
    assert (req.host, req.port) == ("a.example", 8080)
    assert req.head.startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert b"Proxy-Connection" not in req.head and req.head.endswith(b"Connection: close\r\n\r\n")
    with pytest.raises(Refused):
        parse_head(b"GET ftp://x/ HTTP/1.1")


def client_hello(server_name: str) -> bytes:
    """A real ClientHello, made by Python's ssl module, for the parser to read."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_parser_on_garbage() -> None:
    for data in (b"", b"\x16\x03\x01", b"\x16" + b"\xff" * 100, json.dumps({}).encode()):
        assert tls_sni(data) is None
