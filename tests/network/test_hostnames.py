"""The one host normalisation: names to A-labels, IP literals to the address the C library sees."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkernel.network.hostnames import LDH_LABEL, BadHost, normalise_host


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("bl\u00adocked.example", "blocked.example"),  # soft hyphen: ignored by UTS 46
        ("blocked\u200b.example", "blocked.example"),  # zero-width space: ignored too
        ("block\u200ced.example", None),  # zero-width non-joiner: allowed only after a virama
        ("EXAMPLE.com.", "example.com"),
        ("B\u00fccher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a\u3002b\uff0ecom", "a.b.com"),  # ideographic and full-width full stops
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "example.com"),  # full-width letters
        ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),  # LDH, though not IDNA 2008
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61])),  # 253
        ("1.2.3.example", "1.2.3.example"),
    ],
)
def test_names(raw: str, name: str | None) -> None:
    if name is None:
        with pytest.raises(BadHost):
            normalise_host(raw)
        return
    host = normalise_host(raw)
    assert (host.name, host.address) == (name, None)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "..",
        "a..b",
        ".a",
        "a.b..",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 characters
        "a b.com",
        "a\tb.com",
        "a\x00b.com",
        "a\u3000b.com",  # ideographic space
        "a%2eb.com",
        "user@host.com",
        "user:pw@host.com",
        "host.com/path",
        "a_b.com",
        "-a.com",
        "a-.com",
        "xn--abc.com",  # not Punycode of anything valid
        "ex\uff05ample.com",  # full-width percent sign
        "x" * 2000,
    ],
)
def test_not_host_names(raw: str) -> None:
    with pytest.raises(BadHost):
        normalise_host(raw)


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("169.254.43518", "169.254.169.254"),
        ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127.0.0.1"),  # full-width digits
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
    ],
)
def test_ip_literals(raw: str, address: str) -> None:
    host = normalise_host(raw)
    assert host.address == ipaddress.ip_address(address)
    assert host.name == str(host.address)


@pytest.mark.parametrize(
    "raw",
    [
        "256.1.1.1",
        "1.2.3.4.5",
        "08.1.1.1",
        "1.2.3.09",
        "0x100000000",
        "example.123",
        "1.2.3.4294967296",
        "[::1",
        "::g",
    ],
)
def test_bad_ip_literals(raw: str) -> None:
    """A name that ends in a number must be an address; what else it might mean is not guessed."""
    with pytest.raises(BadHost):
        normalise_host(raw)


@st.composite
def ipv4_spellings(draw: st.DrawFn) -> tuple[str, int]:
    """An IPv4 address written the ways inet_aton reads: 1 to 4 parts, each decimal, octal or hex."""
    value = draw(st.integers(0, 2**32 - 1))
    count = draw(st.integers(1, 4))
    octets = value.to_bytes(4, "big")
    parts = [*octets[: count - 1], int.from_bytes(octets[count - 1 :], "big")]
    spelled = []
    for part in parts:
        form = draw(st.sampled_from(["dec", "oct", "hex", "HEX"]))
        spelled.append(
            {"dec": str(part), "oct": f"0{part:o}", "hex": f"0x{part:x}", "HEX": f"0X{part:X}"}[form]
        )
    return ".".join(spelled), value


@given(ipv4_spellings())
def test_ipv4_spellings_mean_what_inet_aton_says(spelling: tuple[str, int]) -> None:
    text, value = spelling
    assert int.from_bytes(socket.inet_aton(text), "big") == value  # the C library's reading
    assert normalise_host(text).address == ipaddress.IPv4Address(value)


@given(st.text(max_size=80))
def test_any_text_is_a_host_or_refused(text: str) -> None:
    """No other exception; a result is an address or LDH labels, and normalising it again is a no-op."""
    try:
        host = normalise_host(text)
    except BadHost:
        return
    if host.address is None:
        assert len(host.name) <= 253 and all(LDH_LABEL.fullmatch(label) for label in host.name.split("."))
    assert normalise_host(host.name) == host


@given(st.from_regex(r"[A-Za-z0-9\u00ad\u00c0-\u024f\u3002-]{1,20}(\.[a-z]{2,6}){1,2}\.?", fullmatch=True))
def test_names_normalise_idempotently(text: str) -> None:
    try:
        host = normalise_host(text)
    except BadHost:
        return
    assert normalise_host(host.name) == host
    assert normalise_host(text.upper() if text.isascii() else text) == host
