import ipaddress

import pytest

from agentkernel.network.policy import EgressRules, is_host_local, matches

ip = ipaddress.ip_address


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
        ("::1", True),
        ("fd00::1", True),
        ("fe80::1", True),
        ("::ffff:127.0.0.1", True),
        ("151.101.0.223", False),
        ("2a04:4e42::223", False),
    ],
)
def test_host_local(address: str, local: bool) -> None:
    assert is_host_local(ip(address)) is local


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
    assert default.decide("pypi.org", public).allowed
    assert not default.decide("localhost", [ip("127.0.0.1")]).allowed
    assert not default.decide("metadata", [ip("169.254.169.254")]).allowed
    assert not default.decide("nowhere", []).allowed
    rules = EgressRules(allow=("*.pypi.org", "127.0.0.1"), block=("bad.pypi.org",))
    assert rules.decide("files.pypi.org", public).allowed
    assert not rules.decide("bad.pypi.org", public).allowed  # block wins
    assert rules.decide("127.0.0.1", [ip("127.0.0.1")]).allowed  # allowed on purpose
    assert not rules.decide("rebind.example", [ip("10.0.0.1")]).allowed
    only = EgressRules(allow=("pypi.org",), allowlist_only=True)
    assert only.decide("pypi.org", public).allowed
    decision = only.decide("example.com", public)
    assert not decision.allowed and "allowlist_only" in decision.reason
