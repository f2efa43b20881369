import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkernel.errors import AgentkernelError
from agentkernel.network.hostnames import normalise_host
from agentkernel.network.policy import EgressRules, embedded_ipv4, is_host_local, matches

ip = ipaddress.ip_address
host = normalise_host


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1", True),
        ("169.254.169.254", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("::", True),
        ("::1", True),
        ("fd00::1", True),
        ("fe80::1", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),
        ("151.101.0.223", False),
        ("2a04:4e42::223", False),
        # IPv6 addresses carrying an IPv4 address are judged by it.
        ("::127.0.0.1", True),  # IPv4-compatible
        ("::169.254.169.254", True),
        ("::ffff:0:127.0.0.1", True),  # IPv4-translated
        ("::ffff:0:10.0.0.1", True),
        ("64:ff9b::127.0.0.1", True),  # NAT64
        ("64:ff9b::192.168.0.1", True),
        ("64:ff9b:1::8.8.8.8", True),  # local-use NAT64: never global
        ("2002:7f00:1::1", True),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", True),  # 6to4 of 169.254.169.254
        ("2001:0:808:808:0:0:80ff:fffe", True),  # Teredo, client 127.0.0.1 (inverted)
        ("::8.8.8.8", False),
        ("::ffff:8.8.8.8", False),
        ("::ffff:0:8.8.8.8", False),
        ("64:ff9b::8.8.8.8", False),
        ("2002:808:808::1", False),
    ],
)
def test_host_local(address: str, local: bool) -> None:
    assert is_host_local(ip(address)) is local


def test_teredo_client_is_the_inverted_last_32_bits() -> None:
    assert ip("127.0.0.1") in embedded_ipv4(ip("2001:0:808:808:0:0:80ff:fffe"))


EMBEDDINGS = {
    "compatible": lambda v4: ipaddress.IPv6Address(v4),
    "mapped": lambda v4: ipaddress.IPv6Address((0xFFFF << 32) | v4),
    "translated": lambda v4: ipaddress.IPv6Address((0xFFFF << 48) | v4),
    "nat64": lambda v4: ipaddress.IPv6Address((0x64FF9B << 96) | v4),
    "6to4": lambda v4: ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 0xABCD),
}


@given(st.integers(2, 2**32 - 1), st.sampled_from(sorted(EMBEDDINGS)))
def test_an_embedded_ipv4_address_is_judged_as_itself(v4: int, form: str) -> None:
    address = EMBEDDINGS[form](v4)
    assert embedded_ipv4(address) == (ipaddress.IPv4Address(v4),)
    assert is_host_local(address) is is_host_local(ipaddress.IPv4Address(v4))


def test_patterns() -> None:
    assert matches("pypi.org", "pypi.org")
    assert not matches("pypi.org", "evil-pypi.org")
    assert matches("*.pypi.org", "files.pypi.org")
    assert matches("*.pypi.org", "a.b.pypi.org")
    assert not matches("*.pypi.org", "pypi.org")
    assert not matches("*.pypi.org", "evilpypi.org")


def test_decisions() -> None:
    public = [ip("151.101.0.223")]
    default = EgressRules()
    assert default.decide(host("pypi.org"), public).allowed
    assert not default.decide(host("localhost"), [ip("127.0.0.1")]).allowed
    assert not default.decide(host("metadata"), [ip("169.254.169.254")]).allowed
    assert not default.decide(host("nowhere"), []).allowed
    rules = EgressRules(allow=("*.pypi.org", "127.0.0.1"), block=("bad.pypi.org",))
    assert rules.decide(host("files.pypi.org"), public).allowed
    assert not rules.decide(host("bad.pypi.org"), public).allowed  # block wins
    assert rules.decide(host("127.0.0.1"), [ip("127.0.0.1")]).allowed  # allowed on purpose
    assert not rules.decide(host("rebind.example"), [ip("10.0.0.1")]).allowed
    only = EgressRules(allow=("pypi.org",), allowlist_only=True)
    assert only.decide(host("pypi.org"), public).allowed
    decision = only.decide(host("example.com"), public)
    assert not decision.allowed and "allowlist_only" in decision.reason


def test_embedded_loopback_reason_names_the_carried_address() -> None:
    decision = EgressRules().decide(host("::ffff:0:127.0.0.1"), [ip("::ffff:0:127.0.0.1")])
    assert not decision.allowed and "carries 127.0.0.1" in decision.reason


def test_a_blocked_ipv4_address_stays_blocked_inside_ipv6() -> None:
    rules = EgressRules(block=("8.8.8.8",))
    for literal in ("::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"):
        decision = rules.decide(host(literal), [ip(literal)])
        assert not decision.allowed and "block" in decision.reason, literal


def test_patterns_are_normalised_like_hosts() -> None:
    rules = EgressRules(allow=("B\u00fccher.example",), block=("BL\u00adOCKED.example.", "*.Evil.example"))
    public = [ip("151.101.0.223")]
    assert rules.allow == ("xn--bcher-kva.example",)
    assert rules.decide(host("xn--bcher-kva.example"), public).reason.startswith("allowed by pattern")
    assert not rules.decide(host("blocked.example"), public).allowed
    assert not rules.decide(host("a.evil.example"), public).allowed
    with pytest.raises(AgentkernelError, match="not a host name"):
        EgressRules(block=("example.123",))


def test_a_name_resolving_to_an_embedded_loopback_is_refused() -> None:
    """Lookups go through the same classification: one AAAA record carrying 127.0.0.1 is enough."""
    decision = EgressRules().decide(host("rebind.example"), [ip("151.101.0.223"), ip("64:ff9b::127.0.0.1")])
    assert not decision.allowed and decision.reason.startswith("host-local address 64:ff9b::7f00:1")
