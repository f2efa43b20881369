"""Egress policy: which destinations a sandbox may reach.

By default everything public is allowed and everything host-local is refused: loopback, link-local
(169.254.169.254, the cloud metadata address, among them), private (RFC 1918, ULA) and other
non-global ranges. `security.domains` adds `allow` and `block` lists of host patterns (`pypi.org`
exactly, `*.pypi.org` for its subdomains); block wins; with `allowlist_only` only allowed hosts are
reachable. An allowed pattern also opens a host-local destination, so a test server on the host's
loopback can be reached on purpose.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class EgressRules:
    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    allowlist_only: bool = False

    def decide(self, host: str, addresses: list[IPAddress]) -> Decision:
        host = host.lower().rstrip(".")
        names = [host, *(str(a) for a in addresses)]
        if blocked := next((p for p in self.block if any(matches(p, n) for n in names)), None):
            return Decision(False, f"blocked by security.domains.block pattern {blocked}")
        allowed = next((p for p in self.allow if any(matches(p, n) for n in names)), None)
        if self.allowlist_only and allowed is None:
            return Decision(False, "not in security.domains.allow (allowlist_only)")
        if allowed is None and (local := next((a for a in addresses if is_host_local(a)), None)):
            return Decision(False, f"host-local address {local}")
        if not addresses:
            return Decision(False, "the name did not resolve")
        return Decision(True, f"allowed by pattern {allowed}" if allowed else "public address")


def matches(pattern: str, host: str) -> bool:
    """`pypi.org` matches only itself; `*.pypi.org` matches its subdomains, not pypi.org itself."""
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def is_host_local(address: IPAddress) -> bool:
    """Anything but a global unicast address: loopback, link-local, private, ULA, reserved, multicast."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def is_loopback_name(host: str) -> bool:
    """Whether a host name or address (no port) means this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
