"""The gateway's DNS over TCP, on a real Unix socket, with real lookups on the host."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from pathlib import Path

import pytest

from agentkernel.network.dns import AAAA, FORMERR, REFUSED, BadQuery, Resolver, build_answer, parse_query
from agentkernel.network.gateway import Gateway
from agentkernel.network.policy import EgressRules
from agentkernel.service import audit

A = 1


def query(name: str | bytes, qtype: int = A, qid: int = 0x1234) -> bytes:
    raw = name if isinstance(name, bytes) else name.encode()
    labels = b"".join(bytes([len(part)]) + part for part in raw.split(b"."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack(">HH", qtype, 1)


def answers(reply: bytes) -> tuple[int, list[str]]:
    rcode = struct.unpack_from(">H", reply, 2)[0] & 0xF
    count = struct.unpack_from(">H", reply, 6)[0]
    if count == 0:
        return rcode, []
    found, pos = [], reply.index(b"\xc0\x0c")
    for _ in range(count):
        _, rtype, _, _, length = struct.unpack_from(">HHHIH", reply, pos)
        data = reply[pos + 12 : pos + 12 + length]
        found.append(".".join(map(str, data)) if rtype == A else data.hex())
        pos += 12 + length
    return rcode, found


async def ask(sock: Path, message: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(struct.pack(">H", len(message)) + message)
    size = struct.unpack(">H", await reader.readexactly(2))[0]
    reply = await reader.readexactly(size)
    writer.close()
    return reply


def ask_gateway(tmp_path: Path, rules: EgressRules, *messages: bytes) -> list[tuple[int, list[str]]]:
    """Each message's answer from a real gateway's resolver on a Unix socket."""

    async def body() -> list[tuple[int, list[str]]]:
        sock = tmp_path / "dns.sock"
        server = await asyncio.start_unix_server(
            Resolver(Gateway("dnstest", rules).dns_lookup).handle, path=str(sock)
        )
        async with server:
            return [answers(await ask(sock, message)) for message in messages]

    return asyncio.run(asyncio.wait_for(body(), 20))


def dns_audit() -> list[dict[str, object]]:
    return [e for e in audit.entries("dnstest") if e["event"] == "network"]


def test_allowed_name_resolves_and_refused_name_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    (rcode, found), refused = ask_gateway(
        tmp_path, EgressRules(allow=("localhost",)), query("localhost"), query("ip6-localhost", AAAA)
    )
    assert rcode == 0 and "127.0.0.1" in found
    assert refused == (REFUSED, [])
    assert [(e["method"], e["host"], e["allowed"]) for e in dns_audit()] == [
        ("DNS", "localhost", True),
        ("DNS", "ip6-localhost", False),
    ]


def test_names_are_normalised_before_the_policy(isolated_home: Path, tmp_path: Path) -> None:
    """A soft hyphen in a label, capitals, a number that is an address: judged as what they denote."""
    rules = EgressRules(allow=("127.0.0.1",), block=("localhost",))
    replies = ask_gateway(
        tmp_path, rules, query("loc\u00adalhost"), query("LOCALHOST"), query("2130706433"), query(b"a\xffb")
    )
    assert replies == [(REFUSED, []), (REFUSED, []), (0, ["127.0.0.1"]), (FORMERR, [])]
    entries = dns_audit()
    assert [(e["host"], e["raw_host"], e["allowed"]) for e in entries] == [
        ("localhost", "loc\u00adalhost", False),
        ("localhost", "LOCALHOST", False),
        ("127.0.0.1", "2130706433", True),
    ]
    assert all("blocked by" in str(e["reason"]) for e in entries[:2])


def test_a_bad_name_is_refused_and_audited(isolated_home: Path, tmp_path: Path) -> None:
    assert (
        ask_gateway(tmp_path, EgressRules(), query("a_b.example"), query("example.123"))
        == [(REFUSED, [])] * 2
    )
    assert [e["allowed"] for e in dns_audit()] == [False, False]


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x00" * 11,
        query("a")[:-3],
        query("x" * 64),
        struct.pack(">HHHHHH", 1, 0x8100, 1, 0, 0, 0),
        query(b"a\xffb.example"),  # not UTF-8
        query(b"x").replace(b"\x01x", b"\x03a.b"),  # a dot inside a label
    ],
)
def test_malformed_queries(message: bytes) -> None:
    with pytest.raises(BadQuery):
        parse_query(message)


def test_answer_echoes_id_and_question() -> None:
    question = parse_query(query("pypi.org", qid=0xBEEF))
    reply = build_answer(
        question, 0, [ipaddress.ip_address("151.101.0.223"), ipaddress.ip_address("2a04:4e42::223")]
    )
    assert reply[:2] == b"\xbe\xef"
    assert answers(reply) == (0, ["151.101.0.223"])  # an A question gets only IPv4 addresses
