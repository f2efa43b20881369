"""The egress gateway of one sandbox: an HTTP proxy, the only way out of a sandbox with network on.

The VMM forwards the guest's proxy address (10.0.2.100:3128 under QEMU user networking, whose
`restrict=on` drops every other packet) to the sandbox's own Unix socket, which the shared gateway
process (`host`) serves with this sandbox's Gateway. Each request names its destination: an
absolute URI with a Host header for HTTP, `CONNECT host:port` for HTTPS and other TCP. The gateway
normalises the host once (`hostnames.normalise_host`), resolves the normalised name itself, decides by
the sandbox's EgressRules, connects only to the addresses it checked (no second lookup for the guest to
race), and writes every decision to the audit log. In a tunnel, a TLS ClientHello is read whole, however
it is split, and its server name must be the CONNECT host. Everything read from the guest is bounded.

With secrets (see `brokering`), a CONNECT to one of a secret's hosts is not a tunnel: the gateway
terminates the guest's TLS with a certificate from the sandbox's own CA (`mitm`), replaces the
secret's placeholder with its value, and sends the request on over TLS it verifies itself. Any other
request that carries a placeholder or a value, where the gateway can see it (request heads, plain
HTTP bodies, CONNECT targets, ClientHellos, unencrypted tunnels, DNS names), is refused as an
exfiltration attempt. Inside other hosts' TLS tunnels nothing can be seen.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from agentkernel.network import usage
from agentkernel.network.brokering import Armed, Broker, substitute
from agentkernel.network.hostnames import BadHost, Host, IPAddress, normalise_host
from agentkernel.network.launcher import COMMAND_ID, COMMAND_PASSWORD
from agentkernel.network.policy import Decision, EgressRules
from agentkernel.network.tls import HANDSHAKE, BadHello, read_client_hello
from agentkernel.service import audit

if TYPE_CHECKING:  # mitm loads cryptography: imported where a sandbox with secrets needs it
    from agentkernel.network.mitm import Issuer, TLSServer

MAX_HEAD = 64 * 1024
MAX_CONNECTIONS = 256
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
RESOLVE_TIMEOUT = 10.0
# Lookups block a thread each (getaddrinfo), which a timeout does not free: a sandbox holds at most
# MAX_LOOKUPS of them, until they end, from the process's pool far larger than asyncio's default (a
# handful in all), so a guest asking names no server answers starves only itself.
MAX_LOOKUPS = 4
LOOKUP_THREADS = 256
_LOOKUP_POOL = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="lookup")
HELLO_TIMEOUT = 10.0  # for a whole TLS ClientHello, once its first byte arrived (or on port 443)
TLS_PORT = 443
IDLE_TIMEOUT = 600.0
PORT = re.compile(r"[0-9]{1,5}")
AUTHORITY_END = re.compile(r"[/?#]")
HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive"}
MAX_BODY = 32 * 1024 * 1024  # a brokered request's body is read whole (to check and rewrite it)
CHECKED_PREFIX = 1024 * 1024  # of a plain request body, read before its head is sent on
MAX_CAPTURE = 4 * 1024 * 1024  # of a brokered response, kept to read its token usage
MAX_CREDENTIAL = 256  # of a Proxy-Authorization token; a command id's is 36 characters
BROKERED_DROP = HOP_HEADERS | {"host", "content-length", "transfer-encoding", "expect", "te", "upgrade"}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TunnelRefused(Exception):
    """The tunnel's first bytes broke the policy (already audited): the tunnel is closed."""


@dataclass(frozen=True)
class Request:
    method: str
    host: Host
    port: int
    head: bytes  # what to send upstream (HTTP), empty for CONNECT
    body_length: int
    raw_host: str  # the host as the guest wrote it
    command: str | None = None  # the id of the command that sent it, as the guest claims it


def claimed_command(headers: Sequence[tuple[str, str]]) -> str | None:
    """The command id a request's Proxy-Authorization carries (`launcher.proxy_env` puts it in every
    command's proxy address), or None where there is none or it is malformed. The guest can send any
    id or none: it labels audit entries and never changes a decision."""
    values = [v for k, v in headers if k == "proxy-authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "basic" or not 0 < len(token) <= MAX_CREDENTIAL:
        return None
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode("ascii").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    if not sep or password not in ("", COMMAND_PASSWORD) or not COMMAND_ID.fullmatch(user):
        return None
    return user


def command_of_head(headers: bytes) -> str | None:
    """`claimed_command` of the header lines of a request head that may not parse as a whole."""
    lines = headers.decode("latin-1").split("\r\n")
    return claimed_command([(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)])


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
        raw, host, port = split_host_port(target, default_port=None)
        return Request(method, host, port, b"", 0, raw, claimed_command(headers))
    if not target.startswith("http://"):
        raise Refused(400, "only absolute http:// URIs and CONNECT are proxied")
    rest = target[len("http://") :]
    authority = AUTHORITY_END.split(rest, maxsplit=1)[0]
    path = rest[len(authority) :]
    raw, host, port = split_host_port(authority, default_port=80)
    host_headers = [v for k, v in headers if k == "host"]
    if len(host_headers) > 1:
        raise Refused(400, "more than one Host header")
    if host_headers and split_host_port(host_headers[0], default_port=80)[1:] != (host, port):
        raise Refused(400, "Host header does not match the request URI")
    if any(k == "transfer-encoding" for k, _ in headers):
        raise Refused(501, "chunked request bodies are not proxied")
    try:
        length = int(next((v for k, v in headers if k == "content-length"), "0"))
    except ValueError:
        raise Refused(400, "bad Content-Length") from None
    if length < 0:
        raise Refused(400, "bad Content-Length")
    # Upstream gets the Host the policy judged, not the guest's spelling of it.
    host_header = host.authority + ("" if port == 80 else f":{port}")
    kept = [f"{k}: {v}" for k, v in headers if k not in HOP_HEADERS and k != "host"]
    request_line = f"{method} {path if path.startswith('/') else '/' + path} {version}"
    upstream = "\r\n".join([request_line, f"Host: {host_header}", *kept, "Connection: close", "", ""])
    return Request(method, host, port, upstream.encode("latin-1"), length, raw, claimed_command(headers))


def split_host_port(value: str, *, default_port: int | None) -> tuple[str, Host, int]:
    """The host as written (UTF-8 in the head, which is read as Latin-1), normalised, and the port."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]") + 1
        raw, rest = value[:end], value[end:]
        if not end or (rest and not rest.startswith(":")):
            raise Refused(400, f"bad destination {value[:100]!r}")
        port_text = rest[1:]
    else:
        raw, _, port_text = value.partition(":")
    if not port_text:
        if default_port is None:
            raise Refused(400, "CONNECT needs host:port")
        port_text = str(default_port)
    if not PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise Refused(400, f"bad port in {value[:100]!r}")
    try:
        raw = raw.encode("latin-1").decode("utf-8")
        return raw, normalise_host(raw), int(port_text)
    except UnicodeDecodeError:
        raise Refused(400, f"destination {value[:100]!r} is not UTF-8") from None
    except BadHost as exc:
        raise Refused(400, f"bad destination {raw[:100]!r}: {exc}") from None


class Gateway:
    def __init__(
        self, sandbox: str, rules: EgressRules, broker: Broker | None = None, issuer: Issuer | None = None
    ) -> None:
        self.sandbox = sandbox
        self.rules = rules
        self.broker = broker or Broker(())
        self.issuer = issuer
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.lookups = asyncio.Semaphore(MAX_LOOKUPS)  # shared by the proxy and DNS
        self.open: set[asyncio.StreamWriter] = set()  # the guest's connections being served

    def close(self) -> None:
        """End every connection of this sandbox (it was withdrawn: its VMM is gone)."""
        for writer in list(self.open):
            writer.transport.abort()

    def _audit(
        self,
        decision: Decision,
        req: Request | None,
        addresses: Sequence[IPAddress] = (),
        *,
        method: str | None = None,  # when there is no request
    ) -> None:
        audit.record(
            "network",
            self.sandbox,
            method=req.method if req else method,
            host=req.host.name if req else None,
            raw_host=req.raw_host if req else None,
            port=req.port if req else None,
            addresses=[str(a) for a in addresses],
            allowed=decision.allowed,
            reason=decision.reason,
            command=req.command if req else None,
        )

    async def judge(self, req: Request) -> list[IPAddress]:
        """Resolve the request's host, decide and audit: the addresses to use, or Refused(403)."""
        addresses = await resolve(req.host, req.port, self.lookups)
        decision = self.rules.decide(req.host, addresses)
        self._audit(decision, req, addresses)
        if not decision.allowed:
            raise Refused(403, decision.reason)
        return addresses

    async def dns_lookup(self, name: str) -> list[IPAddress] | None:
        """The answer to a DNS question for `name`: the checked addresses, None if refused."""
        try:
            if leak := self.broker.leak(name.encode("utf-8", "replace"), ""):
                self._exfiltration(leak.secret, leak.what, "dns", None)
            return await self.judge(Request("DNS", normalise_host(name), 53, b"", 0, name))
        except BadHost as exc:
            self._audit(Decision(False, f"bad name {name[:100]!r}: {exc}"), None, method="DNS")
        except Refused:
            pass
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.slots.locked():
            await _respond(writer, 503, "too many connections")
            return
        self.open.add(writer)
        async with self.slots:
            req: Request | None = None
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
                try:
                    req = parse_head(head[:-4])
                except Refused:
                    self._check_head(None, head)  # a secret in a head too bad to parse is still one
                    raise
                self._check_head(req, head)
                addresses = await self.judge(req)
                if req.method == "CONNECT" and self.issuer and self.broker.for_host(req.host.name):
                    await self._broker(req, addresses, reader, writer, self.issuer)
                    return
                upstream = await self._connect(addresses, req.port)
                await self._serve(req, reader, writer, upstream)
            except Refused as exc:
                if exc.status != 403:
                    self._audit(Decision(False, exc.reason), req)
                await _respond(writer, exc.status, exc.reason)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                await _respond(writer, 400, "request head missing, too large or too slow")
            except (OSError, TunnelRefused):
                pass
            finally:
                self.open.discard(writer)
                writer.close()

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
                # What the destination says first reaches the guest at once (some protocols start
                # with the server); what the guest says goes out only once checked.
                down = asyncio.create_task(_pipe(up_reader, writer))
                try:
                    scan = self._scanner(req, "tunnel")
                    first = await self._tunnel_start(req, reader)
                    try:
                        up_writer.write(scan(first) if scan else first)
                    except Refused:  # audited; the tunnel is established, no HTTP answer fits
                        raise TunnelRefused("a secret in the tunnel") from None
                    await asyncio.gather(_pipe(reader, up_writer, scan), down)
                finally:
                    down.cancel()
                    await asyncio.wait([down])
            else:
                scan, first = self._scanner(req, "body"), b""
                if scan and req.body_length:  # checked before anything is sent: the head too
                    size = min(req.body_length, CHECKED_PREFIX)
                    first = scan(await asyncio.wait_for(reader.readexactly(size), IDLE_TIMEOUT))
                up_writer.write(req.head + first)
                if req.body_length > len(first):
                    await _copy_exactly(reader, up_writer, req.body_length - len(first), scan)
                await up_writer.drain()
                await _pipe(up_reader, writer)
        finally:
            up_writer.close()

    async def _tunnel_start(self, req: Request, reader: asyncio.StreamReader) -> bytes:
        """The guest's first bytes in a tunnel, checked. Where they start a TLS handshake, and always on
        port 443, they must be a whole ClientHello naming the CONNECT host; other protocols pass."""
        tls_only = req.port == TLS_PORT
        try:
            first = await asyncio.wait_for(reader.read(1), HELLO_TIMEOUT if tls_only else IDLE_TIMEOUT)
            if not first or (first[0] != HANDSHAKE and not tls_only):
                return first
            if first[0] != HANDSHAKE:
                raise BadHello("not a TLS handshake record")
            records, sni = await asyncio.wait_for(read_client_hello(reader, first), HELLO_TIMEOUT)
        except BadHello as exc:
            self._refuse_tunnel(req, f"not a well-formed TLS ClientHello: {exc}")
        except TimeoutError:
            if not tls_only:
                raise TunnelRefused("idle") from None
            self._refuse_tunnel(req, f"no whole TLS ClientHello within {HELLO_TIMEOUT:.0f} s")
        except (asyncio.IncompleteReadError, OSError):
            raise TunnelRefused("the guest closed the tunnel") from None
        self._check_sni(req, sni)
        return records

    def _check_sni(self, req: Request, sni: str | None) -> None:
        """A server name must be the CONNECT host's; to an IP literal, which TLS clients send no name
        for (RFC 6066), a name is judged by the policy at that address."""
        if sni is None:
            if req.host.address is None:
                self._refuse_tunnel(req, "the TLS ClientHello names no server")
            return
        try:
            name = normalise_host(sni)
        except BadHost as exc:
            self._refuse_tunnel(req, f"TLS server name {sni[:100]!r}: {exc}")
        if name == req.host:
            return
        tls = Request("TLS", name, req.port, b"", 0, sni, req.command)
        if req.host.address is None or name.address is not None:
            self._refuse_tunnel(tls, f"TLS server name {name.name} differs from CONNECT host {req.host.name}")
        decision = self.rules.decide(name, [req.host.address])
        self._audit(decision, tls, [req.host.address])
        if not decision.allowed:
            raise TunnelRefused(decision.reason)

    # -- secrets ----------------------------------------------------------------------------------

    def _exfiltration(
        self, secret: str, what: str, where: str, req: Request | None, **fields: Any
    ) -> NoReturn:
        """Audit an attempt to send a secret (its placeholder or value) where it may not go; refuse it."""
        if req is not None:
            fields.update(host=req.host.name, port=req.port, method=req.method, command=req.command)
        fields.setdefault("command", None)
        audit.record("exfiltration", self.sandbox, secret=secret, what=what, where=where, **fields)
        raise Refused(403, f"secret {secret} may not be sent to this host: refused and audited")

    def _check_head(self, req: Request | None, head: bytes) -> None:
        """A request head must carry no secret that is not its host's (`req` None: a head that did not
        parse, whose host is unknown); a secret's own placeholder goes to its host only over TLS the
        gateway terminates (CONNECT), never in the clear."""
        if not self.broker:
            return
        line, _, rest = head.partition(b"\r\n")
        host = req.host.name if req else ""
        for where, part in (("connect" if line.startswith(b"CONNECT ") else "url", line), ("header", rest)):
            if leak := self.broker.leak(part, host):
                command = {} if req else {"command": command_of_head(rest)}
                self._exfiltration(leak.secret, leak.what, where, req, **command)
        if req is not None and req.method != "CONNECT" and (own := self.broker.any_secret(head)):
            reason = f"secret {own.binding.name} is sent only over HTTPS (a CONNECT tunnel)"
            self._audit(Decision(False, reason), req)
            raise Refused(403, reason)

    def _scanner(self, req: Request, where: str) -> _Scan | None:
        return _Scan(self, req, where) if self.broker else None

    async def _broker(
        self,
        req: Request,
        addresses: list[IPAddress],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        issuer: Issuer,
    ) -> None:
        """Terminate the guest's TLS to a secret host, and serve one request through it."""
        from agentkernel.network.mitm import TLSServer

        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        records = await self._tunnel_start(req, reader)
        if not records or records[0] != HANDSHAKE:
            self._refuse_tunnel(req, "a secret's host is reached over TLS only")
        tls = TLSServer(issuer.context(req.host), reader, writer, records, limit=MAX_HEAD)
        try:
            await tls.handshake(HELLO_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # The guest does not trust the sandbox CA (or speaks no TLS): nothing reaches the host.
            self._refuse_tunnel(req, f"TLS with the guest failed: {str(exc)[:200]}")
        pump = asyncio.create_task(tls.pump(IDLE_TIMEOUT))
        try:
            await self._brokered_request(req, addresses, tls)
        except Refused as exc:
            if exc.status != 403:
                self._audit(Decision(False, exc.reason), req)
            with contextlib.suppress(OSError):
                await tls.write(_response(exc.status, exc.reason))
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            with contextlib.suppress(OSError):
                await tls.write(_response(400, "request head missing, too large or too slow"))
        finally:
            await tls.close()
            pump.cancel()
            await asyncio.wait([pump])

    async def _brokered_request(self, req: Request, addresses: list[IPAddress], tls: TLSServer) -> None:
        started = time.monotonic()
        head = await asyncio.wait_for(tls.reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        method, target, headers = _parse_origin_head(head[:-4])
        if any(v.lower() == "100-continue" for k, v in headers if k.lower() == "expect"):
            await tls.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(tls.reader, headers)
        inner = Request(method, req.host, req.port, b"", len(body), req.raw_host, req.command)
        line, _, rest = head.partition(b"\r\n")
        for where, part in (("url", line), ("header", rest), ("body", body)):
            if leak := self.broker.leak(part, req.host.name):
                self._exfiltration(leak.secret, leak.what, where, inner, path=_path_only(target))
        armed = self.broker.for_host(req.host.name)
        used: set[str] = set()
        kept = []
        for name, value in headers:
            if name.lower() not in BROKERED_DROP:
                new, names = substitute(value.encode("latin-1"), armed)
                kept.append(f"{name}: {new.decode('latin-1')}")
                used.update(names)
        target_bytes, names = substitute(target.encode("latin-1"), [a for a in armed if a.binding.in_url])
        used.update(names)
        body, names = substitute(body, [a for a in armed if a.binding.in_body])
        used.update(names)
        port = "" if req.port == TLS_PORT else f":{req.port}"
        upstream_head = "\r\n".join(
            [
                f"{method} {target_bytes.decode('latin-1')} HTTP/1.1",
                f"Host: {req.host.authority}{port}",
                *kept,
                *([f"Content-Length: {len(body)}"] if body or method in ("POST", "PUT", "PATCH") else []),
                "Connection: close",
                "",
                "",
            ]
        ).encode("latin-1")
        up_reader, up_writer = await self._connect_tls(addresses, req, armed)
        try:
            up_writer.write(upstream_head + body)
            await up_writer.drain()
            status, sent, captured, encoding = await _relay_response(up_reader, tls, method)
        finally:
            up_writer.close()
        audit.record(
            "model_request",
            self.sandbox,
            method=method,
            host=req.host.name,
            port=req.port,
            path=_path_only(target),
            status=status,
            request_bytes=len(body),
            response_bytes=sent,
            secrets=sorted(used),
            usage=usage.extract(captured, encoding),
            duration_ms=int((time.monotonic() - started) * 1000),
            command=req.command,
        )

    async def _connect_tls(
        self, addresses: list[IPAddress], req: Request, armed: list[Armed]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A verified TLS connection to the secret host (at an address the policy checked)."""
        from agentkernel.network.mitm import upstream_context

        ca = next((a.binding.upstream_ca for a in armed if a.binding.upstream_ca), None)
        context = upstream_context(ca)
        last = "no address"
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(
                        str(address), req.port, ssl=context, server_hostname=req.host.name, limit=MAX_HEAD
                    ),
                    CONNECT_TIMEOUT,
                )
            except ssl.SSLError as exc:
                last = f"{address}: TLS: {exc.reason or exc}"
            except (OSError, TimeoutError) as exc:
                last = f"{address}: {exc}"
        raise Refused(502, f"cannot connect: {last}")

    def _refuse_tunnel(self, req: Request, reason: str) -> NoReturn:
        tls = Request("TLS", req.host, req.port, b"", 0, req.raw_host, req.command)
        self._audit(Decision(False, reason), tls)
        raise TunnelRefused(reason)


async def resolve(host: Host, port: int, slots: asyncio.Semaphore) -> list[IPAddress]:
    """The addresses `host` denotes: an IP literal's own; for a name, the host's lookup of exactly the
    normalised name (bytes reach the resolver as they are, a str would be IDNA-encoded once more).
    A lookup holds one of `slots` until its thread ends, even one given up after RESOLVE_TIMEOUT."""
    if host.address is not None:
        return [host.address]
    name = host.name.encode("ascii")
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            await slots.acquire()
            lookup = asyncio.get_running_loop().run_in_executor(
                _LOOKUP_POOL, socket.getaddrinfo, name, port, 0, socket.SOCK_STREAM
            )
            lookup.add_done_callback(lambda done: _lookup_ended(done, slots))
            infos = await asyncio.shield(lookup)
    except (OSError, TimeoutError):
        return []
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _lookup_ended(done: asyncio.Future[Any], slots: asyncio.Semaphore) -> None:
    slots.release()
    if not done.cancelled():
        done.exception()  # retrieved: one given up on is not reported as never retrieved


class _Scan:
    """Checks what the guest sends on a connection for secrets, before each piece goes out. The
    last bytes of each piece are kept to look at with the next, so a secret split across pieces is
    found before its end is sent (the host gets at most a part of it)."""

    def __init__(self, gateway: Gateway, req: Request, where: str) -> None:
        self.gateway, self.req, self.where = gateway, req, where
        self.tail = b""

    def __call__(self, data: bytes) -> bytes:
        if leak := self.gateway.broker.leak(self.tail + data, self.req.host.name):
            self.gateway._exfiltration(leak.secret, leak.what, self.where, self.req)
        keep = self.gateway.broker.longest - 1
        self.tail = (self.tail + data)[-keep:] if keep > 0 else b""
        return data


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, scan: _Scan | None = None) -> None:
    try:
        while data := await asyncio.wait_for(src.read(65536), IDLE_TIMEOUT):
            dst.write(scan(data) if scan else data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, TimeoutError):
        dst.close()
    except Refused:  # a secret in the stream: audited; the tunnel ends
        dst.close()
        raise TunnelRefused("a secret in the tunnel") from None


async def _copy_exactly(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int, scan: _Scan | None = None
) -> None:
    while n > 0:
        data = await asyncio.wait_for(src.read(min(n, 65536)), IDLE_TIMEOUT)
        if not data:
            raise OSError("client closed during the request body")
        dst.write(scan(data) if scan else data)
        await dst.drain()
        n -= len(data)


def _parse_origin_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    """Method, target and headers of a request inside a brokered TLS connection."""
    text = head.decode("latin-1")
    request_line, *lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise Refused(400, "malformed request line (HTTP/1.1 with an origin-form target is proxied)")
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Refused(400, "malformed header line")
        headers.append((name, value.strip()))
    return parts[0], parts[1], headers


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    """A request body, whole (Content-Length or chunked), at most MAX_BODY bytes."""
    fields = {k.lower(): v for k, v in headers}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), HEAD_TIMEOUT)
            size = int(size_line.split(b";")[0].strip() or b"x", 16)
            if size < 0 or len(body) + size > MAX_BODY:
                raise Refused(413, f"request body over {MAX_BODY} bytes")
            if size == 0:
                while (await asyncio.wait_for(reader.readuntil(b"\r\n"), HEAD_TIMEOUT)) != b"\r\n":
                    pass  # trailers are dropped
                return bytes(body)
            body += await asyncio.wait_for(reader.readexactly(size + 2), IDLE_TIMEOUT)
            del body[-2:]
    if "transfer-encoding" in fields:
        raise Refused(501, "only chunked request bodies are proxied")
    length = int(fields.get("content-length", "0"))
    if not 0 <= length <= MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    return await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT) if length else b""


async def _relay_response(
    reader: asyncio.StreamReader, tls: TLSServer, method: str
) -> tuple[int, int, bytes, str]:
    """Relay the host's response to the guest (marked as the connection's last); its status, the
    body bytes relayed, their first MAX_CAPTURE bytes, and their Content-Encoding."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
    except asyncio.IncompleteReadError:
        raise Refused(502, "the host closed the connection without a response") from None
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split(" ")[1])
    except (IndexError, ValueError):
        raise Refused(502, "malformed response from the host") from None
    fields = {}
    kept = [status_line]
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
        if name.strip().lower() not in ("connection", "keep-alive"):
            kept.append(line)
    await tls.write("\r\n".join([*kept, "Connection: close", "", ""]).encode("latin-1"))
    remaining = None
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        remaining = 0
    elif "content-length" in fields and "transfer-encoding" not in fields:
        remaining = int(fields["content-length"])
    sent, captured = 0, bytearray()
    while remaining is None or sent < remaining:
        size = 65536 if remaining is None else min(65536, remaining - sent)
        data = await asyncio.wait_for(reader.read(size), IDLE_TIMEOUT)
        if not data:
            break
        await tls.write(data)
        sent += len(data)
        if len(captured) < MAX_CAPTURE:
            captured += data[: MAX_CAPTURE - len(captured)]
    return status, sent, bytes(captured), fields.get("content-encoding", "")


def _path_only(target: str) -> str:
    """The path of a request target, without its query (which may carry a secret)."""
    return target.split("?", 1)[0].split("#", 1)[0]


def _response(status: int, reason: str) -> bytes:
    titles = {
        400: "Bad Request", 403: "Forbidden", 413: "Content Too Large", 501: "Not Implemented",
        502: "Bad Gateway",
    }  # fmt: skip
    body = f"agentkernel egress gateway: {reason}\n".encode()
    head = f"HTTP/1.1 {status} {titles.get(status, 'Error')}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


async def _respond(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    with contextlib.suppress(OSError):
        writer.write(_response(status, reason))
        await writer.drain()
