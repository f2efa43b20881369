"""Egress policy: which destinations a sandbox may reach.

By default everything public is allowed and everything host-local is refused: loopback, link-local
(169.254.169.254, the cloud metadata address, among them), private (RFC 1918, ULA) and other
non-global ranges. An IPv6 address that carries an IPv4 address (mapped, compatible, translated,
NAT64, 6to4, Teredo) is judged by the IPv4 address too. `security.domains` adds `allow` and `block`
lists of host patterns (`pypi.org` exactly, `*.pypi.org` for its subdomains); block wins; with
`allowlist_only` only allowed hosts are reachable. An allowed pattern also opens a host-local
destination, so a test server on the host's loopback can be reached on purpose.

Hosts come normalised (`hostnames.normalise_host`); the patterns are normalised the same way here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentkernel.errors import AgentkernelError
from agentkernel.network.hostnames import BadHost, Host, IPAddress, normalise_host

if TYPE_CHECKING:
    from agentkernel.network.brokering import SecretBinding

IPv6 = ipaddress.IPv6Network
COMPATIBLE, MAPPED, TRANSLATED = IPv6("::/96"), IPv6("::ffff:0:0/96"), IPv6("::ffff:0:0:0/96")
NAT64 = IPv6("64:ff9b::/96")
LOCAL_NAT64 = IPv6("64:ff9b:1::/48")  # RFC 8215: local use, never global, whatever it carries
SIX_TO_FOUR = IPv6("2002::/16")
TEREDO = IPv6("2001::/32")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class EgressRules:
    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    allowlist_only: bool = False
    secrets: tuple[SecretBinding, ...] = ()  # brokered by the gateway (see `brokering`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(map(normalise_pattern, self.allow)))
        object.__setattr__(self, "block", tuple(map(normalise_pattern, self.block)))

    def decide(self, host: Host, addresses: list[IPAddress]) -> Decision:
        exact = [host.name, *(str(a) for a in addresses)]
        # A blocked IPv4 address stays blocked when it is reached inside an IPv6 address.
        carried = [str(v4) for a in addresses for v4 in embedded_ipv4(a)]
        if blocked := next((p for p in self.block if any(matches(p, n) for n in exact + carried)), None):
            return Decision(False, f"blocked by security.domains.block pattern {blocked}")
        allowed = next((p for p in self.allow if any(matches(p, n) for n in exact)), None)
        if self.allowlist_only and allowed is None:
            return Decision(False, "not in security.domains.allow (allowlist_only)")
        if allowed is None and (local := next((a for a in addresses if is_host_local(a)), None)):
            via = ", ".join(str(v4) for v4 in embedded_ipv4(local))
            return Decision(False, f"host-local address {local}" + (f" (carries {via})" if via else ""))
        if not addresses:
            return Decision(False, "the name did not resolve")
        return Decision(True, f"allowed by pattern {allowed}" if allowed else "public address")


def normalise_pattern(pattern: str) -> str:
    """A pattern's host part normalised like every host."""
    wildcard = "*." if pattern.startswith("*.") else ""
    try:
        return wildcard + normalise_host(pattern[len(wildcard) :]).name
    except BadHost as exc:
        raise AgentkernelError(
            f"security.domains pattern {pattern[:100]!r} is not a host name: {exc}"
        ) from None


def matches(pattern: str, host: str) -> bool:
    """`pypi.org` matches only itself; `*.pypi.org` matches its subdomains, not pypi.org itself."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries: the last 32 bits of an IPv4-compatible (not ::
    or ::1), mapped, translated or NAT64 address; the 6to4 router; Teredo's server and client."""
    if not isinstance(address, ipaddress.IPv6Address) or int(address) <= 1:
        return ()
    if any(address in net for net in (COMPATIBLE, MAPPED, TRANSLATED, NAT64, LOCAL_NAT64)):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address in SIX_TO_FOUR:
        return (ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF),)
    if address in TEREDO and address.teredo is not None:
        return address.teredo
    return ()


def is_host_local(address: IPAddress) -> bool:
    """Anything but a global unicast address: loopback, link-local, private, ULA, reserved, multicast.
    An IPv6 address that carries IPv4 addresses is host-local if any of them is; a compatible, mapped
    or translated one is judged by its IPv4 address alone (those ranges say nothing by themselves)."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = embedded_ipv4(address)
        if any(_not_global(v4) for v4 in carried) or address in LOCAL_NAT64:
            return True
        if carried and any(address in net for net in (COMPATIBLE, MAPPED, TRANSLATED)):
            return False
    return _not_global(address)


def _not_global(address: IPAddress) -> bool:
    return not address.is_global or address.is_multicast


def is_loopback_name(host: str) -> bool:
    """Whether a host name or address (no port) means this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
