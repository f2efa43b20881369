"""The egress gateway on a real Unix socket, in front of real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agentkernel.network.gateway import Gateway, Refused, parse_head
from agentkernel.network.policy import EgressRules
from agentkernel.service import audit
from tests.network.test_tls import client_hello, refragment


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
        b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        b"CONNECT a..example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT .:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a\x00b.example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a%2eb.example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT user@a.example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a_b.example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT " + b"a" * 64 + b".example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT [::1]x:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:\xb2 HTTP/1.1\r\n\r\n",  # a Latin-1 digit, not an ASCII one
        b"CONNECT 256.0.0.1:443 HTTP/1.1\r\n\r\n",
        b"GET http://user@a.example/ HTTP/1.1\r\n\r\n",
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
    assert (req.host.name, req.port) == ("a.example", 8080)
    assert req.head.startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert b"Proxy-Connection" not in req.head and req.head.endswith(b"Connection: close\r\n\r\n")
    with pytest.raises(Refused):
        parse_head(b"GET ftp://x/ HTTP/1.1")


def test_parse_head_sends_the_judged_host_upstream() -> None:
    req = parse_head(b"GET http://LOCAL\xc2\xadHOST.:8080?q HTTP/1.1\r\nHost: localhost:8080\r\nX-A: b")
    assert (req.host.name, req.raw_host) == ("localhost", "LOCAL\u00adHOST.")
    assert req.head == b"GET /?q HTTP/1.1\r\nHost: localhost:8080\r\nx-a: b\r\nConnection: close\r\n\r\n"
    assert parse_head(b"GET http://[::1]/ HTTP/1.1").head.startswith(b"GET / HTTP/1.1\r\nHost: [::1]\r\n")


@asynccontextmanager
async def sink_server(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server that keeps what each connection sent it, and answers with nothing."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(b"")
        while data := await reader.read(65536):
            received[-1] += data
        writer.close()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        yield server.sockets[0].getsockname()[1], received


async def tunnel(sock: Path, target: str, *writes: bytes) -> bytes:
    """CONNECT to `target`, send `writes` one at a time (with a pause between) and the end, return all
    the reply."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    for data in writes:
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(data)
    await writer.drain()
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
RULES_LOCALHOST = EgressRules(allow=("localhost",))
SOFT_HYPHEN = "loc\u00adalhost"


def test_soft_hyphen_name_is_judged_as_the_name_it_becomes(isolated_home: Path, tmp_path: Path) -> None:
    rules = EgressRules(allow=("127.0.0.1",), block=("localhost",))
    utf8 = SOFT_HYPHEN.encode()

    async def body() -> None:
        async with http_server() as port, gateway(tmp_path, rules) as sock:
            for request in (
                b"CONNECT %s:%d HTTP/1.1\r\n\r\n" % (utf8, port),
                b"GET http://%s:%d/ HTTP/1.1\r\n\r\n" % (utf8, port),
                b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (port, utf8, port),
            ):
                answer = await ask(sock, request)
                assert answer.startswith(b"HTTP/1.1 4"), answer
            # The same character as a lone Latin-1 byte is no UTF-8: refused too.
            latin1 = await ask(sock, b"CONNECT loc\xadalhost:%d HTTP/1.1\r\n\r\n" % port)
            assert latin1.startswith(b"HTTP/1.1 400") and b"not UTF-8" in latin1

    run(body)
    blocked = [e for e in audit_entries() if "blocked by" in str(e["reason"])]
    assert [(e["method"], e["host"], e["raw_host"]) for e in blocked] == [
        ("CONNECT", "localhost", SOFT_HYPHEN),
        ("GET", "localhost", SOFT_HYPHEN),
    ]
    assert not any(e["allowed"] for e in audit_entries())


def test_split_client_hello_naming_a_blocked_host_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    hello = client_hello("blocked.example")
    rules = EgressRules(allow=("localhost",), block=("blocked.example",))

    async def body() -> None:
        async with sink_server() as (port, received), gateway(tmp_path, rules) as sock:
            assert await tunnel(sock, f"localhost:{port}", hello[:1], hello[1:]) == ESTABLISHED
            records = refragment(hello, 1, 30)
            await tunnel(sock, f"localhost:{port}", *(records[i : i + 7] for i in range(0, len(records), 7)))
            await asyncio.sleep(0.1)
            assert not any(received), "no byte of a refused ClientHello reaches the destination"

    run(body)
    tls = [e for e in audit_entries() if e["method"] == "TLS"]
    assert len(tls) == 2 and all(e["host"] == "blocked.example" and not e["allowed"] for e in tls)


def test_split_client_hello_naming_the_connect_host_passes_whole(isolated_home: Path, tmp_path: Path) -> None:
    records = refragment(client_hello("localhost"), 1, 2)

    async def body() -> None:
        async with (
            sink_server() as (port, received),
            gateway(tmp_path, EgressRules(allow=("localhost",))) as sock,
        ):
            reply = await tunnel(sock, f"localhost:{port}", records[:1], records[1:20], records[20:])
            assert reply == ESTABLISHED
            await asyncio.sleep(0.1)
            assert received == [records]

    run(body)


def test_client_hello_without_server_name_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            sink_server() as (port, received),
            gateway(tmp_path, EgressRules(allow=("localhost",))) as sock,
        ):
            assert await tunnel(sock, f"localhost:{port}", client_hello(None)) == ESTABLISHED
            await asyncio.sleep(0.1)
            assert received == [b""]

    run(body)
    (entry,) = [e for e in audit_entries() if e["method"] == "TLS"]
    assert not entry["allowed"] and "names no server" in str(entry["reason"])


def test_tunnel_to_an_address_judges_the_server_name(isolated_home: Path, tmp_path: Path) -> None:
    """TLS clients send no name to an IP literal; a name they do send must pass the policy there."""
    rules = EgressRules(allow=("127.0.0.1",), block=("blocked.example",))

    async def body() -> None:
        async with sink_server() as (port, received), gateway(tmp_path, rules) as sock:
            for name in (None, "blocked.example", "fine.example"):
                await tunnel(sock, f"127.0.0.1:{port}", client_hello(name))
            await asyncio.sleep(0.1)
            assert received == [client_hello(None), b"", client_hello("fine.example")]

    run(body)


def test_non_tls_protocols_pass_on_other_ports(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            sink_server() as (port, received),
            gateway(tmp_path, EgressRules(allow=("localhost",))) as sock,
        ):
            await tunnel(sock, f"localhost:{port}", b"S", b"SH-2.0-client\r\n")
            await asyncio.sleep(0.1)
            assert received == [b"SSH-2.0-client\r\n"]

    run(body)


def test_port_443_carries_only_tls_with_a_server_name(isolated_home: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 443))
        except OSError as exc:
            pytest.skip(f"cannot listen on 127.0.0.1:443 here: {exc.strerror}")

    async def body() -> None:
        async with sink_server("127.0.0.1", 443) as (_, received), gateway(tmp_path, RULES_LOCALHOST) as sock:
            await tunnel(sock, "localhost:443", b"GET / HTTP/1.1\r\n\r\n")
            await tunnel(sock, "localhost:443", client_hello(None))
            await tunnel(sock, "localhost:443", client_hello("localhost"))
            await asyncio.sleep(0.1)
            assert [r for r in received if r] == [client_hello("localhost")]

    run(body)
    refused = [str(e["reason"]) for e in audit_entries() if e["method"] == "TLS"]
    assert len(refused) == 2 and "not a well-formed TLS ClientHello" in refused[0]


@pytest.mark.parametrize(
    "target",
    [
        "[::ffff:127.0.0.1]",
        "[::127.0.0.1]",
        "[::ffff:0:127.0.0.1]",
        "[64:ff9b::127.0.0.1]",
        "[64:ff9b::169.254.169.254]",
        "[64:ff9b:1::a00:1]",
        "[2002:7f00:1::1]",
        "[2001:0:808:808::80ff:fffe]",
        "[::1]",
        "2130706433",
        "0x7f.1",
        "017700000001",
        "127.1",
        "127.0.0.1.",
        "0251.0376.0251.0376",  # 169.254.169.254
    ],
)
def test_loopback_and_metadata_in_disguise_are_refused(
    isolated_home: Path, tmp_path: Path, target: str
) -> None:
    async def body() -> None:
        async with gateway(tmp_path, EgressRules()) as sock:
            answer = await ask(sock, f"CONNECT {target}:80 HTTP/1.1\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 403") and b"host-local" in answer, answer

    run(body)
    (entry,) = audit_entries()
    assert entry["allowed"] is False and entry["raw_host"] == target
