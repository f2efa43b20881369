"""Mutual TLS between routers and nodes, beside (or instead of) the shared node key.

Each side has a certificate signed by the fleet's own CA and trusts only that CA: a node serves HTTPS
and refuses a connection without a client certificate from the CA (the handshake fails before any
request is read); a router checks the node's certificate against the CA and the node's host name.
`agentkernel fleet certs DIR` makes the CA and the two certificates (docs/deploy.md has the same steps
with openssl).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkernel.errors import InvalidRequestError
from agentkernel.paths import open_private, private_dir

CA, NODE, ROUTER = "ca", "node", "router"
VALID_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the fleet's CA certificate, this side's certificate and its private key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
        """The three options together, or none of them: a one-line error for anything between, or a
        file that cannot be read."""
        given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
        if not any(given.values()):
            return None
        for option, value in given.items():
            if not value:
                raise InvalidRequestError(option, "--tls-ca, --tls-cert and --tls-key go together")
        for option, value in given.items():
            if not Path(value or "").is_file():
                raise InvalidRequestError(option, f"{value}: no such file")
        files = cls(Path(ca or ""), Path(cert or ""), Path(key or ""))
        files.server_options()  # refuses files that are not PEM, or a key that is not the cert's
        return files

    def client_context(self) -> ssl.SSLContext:
        """A router's context: the node must show a certificate from the CA for its host name."""
        return self._context(ssl.Purpose.SERVER_AUTH)

    def server_options(self) -> dict[str, Any]:
        """uvicorn's options for a node that takes only clients with a certificate from the CA."""
        self._context(ssl.Purpose.CLIENT_AUTH)  # refuses files that would fail only at the first handshake
        return {
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
            "ssl_ca_certs": str(self.ca),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
        }

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(purpose, cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise InvalidRequestError("--tls-ca", f"{self.ca} is not a PEM CA certificate ({exc})") from None
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidRequestError(
                "--tls-cert", f"{self.cert} and {self.key} are not a PEM certificate and its key ({exc})"
            ) from None
        return context


def tls_failure(exc: BaseException) -> str:
    """What failed in a TLS handshake behind `exc` (its causes included), or '' if it was not TLS."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return getattr(seen, "reason", None) or str(seen)
        seen = seen.__cause__ or seen.__context__
    return ""


def make(directory: Path, hosts: Sequence[str]) -> list[Path]:
    """A CA and, signed by it, a node certificate for `hosts` (names or addresses) and a router
    certificate, as PEM files in `directory` (made 0700); the files written, each new and 0600 (a
    one-line error if one is there already, symlinks included)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or "/" in host or " " in host:
                raise InvalidRequestError("--host", f"{host!r} is not a host name or an address") from None
            names.append(x509.DNSName(host))
    stems = (CA, NODE, ROUTER)
    for path in [directory / f"{stem}{end}" for stem in stems for end in (".pem", "-key.pem")]:
        if os.path.lexists(path):
            raise InvalidRequestError(
                "DIRECTORY", f"{path} already exists: certificates are never overwritten"
            )
    private_dir(directory)
    now = datetime.datetime.now(datetime.UTC)

    def subject(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(common: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject(common))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        )

    written = []

    def save(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        key_path, cert_path = directory / f"{stem}-key.pem", directory / f"{stem}.pem"
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for path, data in ((cert_path, cert.public_bytes(serialization.Encoding.PEM)), (key_path, pem)):
            try:
                with open_private(path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                raise InvalidRequestError(
                    "DIRECTORY", f"{path} appeared while writing: not overwritten"
                ) from None
            written.append(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder("agentkernel fleet CA", subject("agentkernel fleet CA"), ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    save(CA, ca_key, ca_cert)
    usages = {
        NODE: [ExtendedKeyUsageOID.SERVER_AUTH],  # never a client: one node cannot act as a router
        ROUTER: [ExtendedKeyUsageOID.CLIENT_AUTH],  # routers serve plain HTTP (or behind a TLS proxy)
    }
    for stem, usage in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        made = builder(f"agentkernel fleet {stem}", ca_cert.subject, key).add_extension(
            x509.ExtendedKeyUsage(usage), critical=False
        )
        if stem == NODE:
            made = made.add_extension(x509.SubjectAlternativeName(names), critical=False)
        save(stem, key, made.sign(ca_key, hashes.SHA256()))
    return written
