"""TLS termination for the hosts a sandbox's secrets go to: a CA of the sandbox's own, and TLS over
the gateway's streams.

The CA is made by the process that starts the gateway, each time it starts it: its key goes to the
gateway on its stdin and is never written anywhere; its certificate goes into the guest (see
`service.sandboxes`). The gateway issues itself a certificate per secret host, signed by that CA,
and speaks TLS through memory BIOs, so the ClientHello it has already read and checked is the
first thing the TLS server sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentkernel.network.hostnames import Host

CA_LIFETIME = dt.timedelta(days=30)  # a sandbox's CA is made anew at each start
LEAF_LIFETIME = dt.timedelta(days=7)
READ_SIZE = 65536
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def make_ca(sandbox: str) -> tuple[bytes, bytes]:
    """A new CA for `sandbox`: (certificate PEM, private key PEM). Only this CA's own hosts'
    certificates can be issued under it (name constraints are not used: secret hosts may be
    wildcards or IP addresses, and the key never leaves the gateway)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentkernel"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"agentkernel sandbox {sandbox[:40]} CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class Issuer:
    """Server contexts for secret hosts, each with a certificate signed by the sandbox's CA."""

    def __init__(self, ca_cert_pem: bytes, ca_key_pem: bytes) -> None:
        self.ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the sandbox CA key is not an EC key")
        self.ca_key = key
        self.contexts: dict[str, ssl.SSLContext] = {}

    def context(self, host: Host) -> ssl.SSLContext:
        if host.name not in self.contexts:
            self.contexts[host.name] = self._new_context(host)
        return self.contexts[host.name]

    def _new_context(self, host: Host) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        san: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(host.name))
            if host.address is not None
            else x509.DNSName(host.name)
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.name[:64])]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + LEAF_LIFETIME, self.ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the gateway reads HTTP/1.1 requests, not HTTP/2
        chain = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # ssl loads certificates only from files: a private temporary file, removed at once.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
            f.write(key_pem + chain)
            f.flush()
            context.load_cert_chain(f.name)
        return context


def upstream_context(ca_file: str | None) -> ssl.SSLContext:
    """How the gateway verifies a secret host: the host's trust store, or `ca_file` alone."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


class TLSServer:
    """The server side of TLS over a stream pair, through memory BIOs. Decrypted bytes are fed to
    `reader`, an ordinary StreamReader (so the HTTP parsing is the same as in the clear)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
        *,
        limit: int,
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.incoming.write(first)
        self.raw_reader, self.raw_writer = reader, writer
        self.reader = asyncio.StreamReader(limit=limit)

    async def handshake(self, timeout: float) -> None:
        """Raises ssl.SSLError (the guest distrusts the certificate, or speaks no TLS), OSError, or
        TimeoutError."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    self.tls.do_handshake()
                    await self._flush()
                    return
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise ConnectionError(
                            "the guest closed the connection during the TLS handshake"
                        ) from None

    async def pump(self, idle: float) -> None:
        """Feed decrypted bytes to `reader` until the guest closes (or goes idle)."""
        try:
            while True:
                try:
                    data = self.tls.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await asyncio.wait_for(self._fill(), idle):
                        break
                    continue
                if not data:
                    break
                self.reader.feed_data(data)
        except (ssl.SSLError, OSError, TimeoutError):
            pass
        finally:
            self.reader.feed_eof()

    async def write(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.tls.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            self.raw_writer.write(data)
            await self.raw_writer.drain()

    async def _fill(self) -> bool:
        data = await self.raw_reader.read(READ_SIZE)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)
