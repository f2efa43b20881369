"""The one normalisation of a destination host, done before any policy decision.

Every way a sandbox names a destination (an HTTP absolute URI, a Host header, a CONNECT target, a TLS
server name, a DNS question) goes through `normalise_host`, so the policy, the audit log and the
resolver all see the same name. A name is mapped by UTS 46 (lower case; invisible characters such as
U+00AD dropped; full-width forms folded) and converted to A-labels; what is not a valid LDH host name
afterwards is refused. An IP literal in any form the C library would accept (`127.1`, `0x7f.1`,
`2130706433`, `[::1]`) becomes the address it denotes, never a name that later resolves to it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_INPUT = 1024  # characters; longer is no host name, and the mapping's work stays bounded
LDH_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NUMBER = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
NOT_IN_A_NAME = re.compile(r"[\x00-\x20\x7f%@/\\?#]")  # controls, whitespace, escapes, userinfo, paths


class BadHost(ValueError):
    """Not a host name or IP literal; the message says why."""


@dataclass(frozen=True)
class Host:
    name: str  # A-labels in lower case without a trailing dot, or the address's canonical text
    address: IPAddress | None = None  # set when the host is an IP literal

    @property
    def authority(self) -> str:
        """The host as written in a URI authority or Host header (IPv6 in brackets)."""
        return f"[{self.name}]" if isinstance(self.address, ipaddress.IPv6Address) else self.name


def normalise_host(raw: str) -> Host:
    """The destination `raw` denotes, or BadHost."""
    if len(raw) > MAX_INPUT:
        raise BadHost("too long")
    if bad := NOT_IN_A_NAME.search(raw):
        raise BadHost(f"contains {bad.group()!r}")
    if raw.startswith("[") or ":" in raw:
        return _ipv6(raw)
    try:
        mapped = idna.uts46_remap(raw, std3_rules=True, transitional=False)
    except (idna.IDNAError, UnicodeError) as exc:
        raise BadHost(str(exc)) from None
    labels = mapped.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot: the root
    if "" in labels:
        raise BadHost("empty label")
    if NUMBER.fullmatch(labels[-1]):
        address = _ipv4(labels)
        return Host(str(address), address)
    name = ".".join(_a_label(label) for label in labels)
    if len(name) > 253:
        raise BadHost("longer than 253 characters")
    return Host(name)


def _ipv6(raw: str) -> Host:
    text = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise BadHost("not an IPv6 address") from None
    return Host(str(address), address)


def _ipv4(labels: list[str]) -> ipaddress.IPv4Address:
    """What inet_aton makes of a name ending in a number: 1 to 4 decimal, octal or hex parts, the last
    filling the remaining bytes. A name that ends in a number but is no address is refused: the C
    library's view of it cannot be predicted."""
    not_ipv4 = BadHost("ends in a number but is not an IPv4 address")
    if len(labels) > 4 or not all(NUMBER.fullmatch(label) for label in labels):
        raise not_ipv4
    try:
        parts = [
            int(label[2:] or "0", 16)
            if label[:2].lower() == "0x"
            else int(label, 8 if label[0] == "0" else 10)
            for label in labels
        ]
    except ValueError:  # 8 or 9 in an octal part
        raise not_ipv4 from None
    *high, last = parts
    if any(p > 255 for p in high) or last >= 256 ** (4 - len(high)):
        raise not_ipv4
    value = last + sum(p << (8 * (3 - i)) for i, p in enumerate(high))
    return ipaddress.IPv4Address(value)


def _a_label(label: str) -> str:
    """One mapped label as an A-label. ASCII labels need only be LDH (not IDNA 2008's stricter rules:
    `r3---sn-abc` is a real host name); `xn--` labels must be valid Punycode in canonical form."""
    try:
        if not label.isascii():
            label = idna.alabel(label).decode("ascii")
        elif label.startswith("xn--") and idna.alabel(idna.ulabel(label)).decode("ascii") != label:
            raise BadHost(f"non-canonical A-label {label!r}")
    except (idna.IDNAError, UnicodeError) as exc:
        raise BadHost(str(exc)) from None
    if not LDH_LABEL.fullmatch(label):
        raise BadHost(f"label {label[:70]!r} is not letters, digits and inner hyphens of at most 63")
    return label
