"""The gateway's DNS over TCP, on a real Unix socket, with real lookups on the host."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from agentkernel.network.dns import AAAA, REFUSED, BadQuery, Resolver, build_answer, parse_query

A = 1


def query(name: str, qtype: int = A, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
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


def test_allowed_name_resolves_and_refused_name_is_refused(tmp_path: Path) -> None:
    decisions: list[tuple[str, list[str]]] = []

    def decide(name: str, addresses: list[str]) -> bool:
        decisions.append((name, addresses))
        return name == "localhost"

    async def body() -> None:
        sock = tmp_path / "dns.sock"
        server = await asyncio.start_unix_server(Resolver(decide).handle, path=str(sock))
        async with server:
            rcode, found = answers(await ask(sock, query("localhost")))
            assert rcode == 0 and "127.0.0.1" in found
            rcode, found = answers(await ask(sock, query("ip6-localhost", AAAA)))
            assert rcode == REFUSED and found == []

    asyncio.run(asyncio.wait_for(body(), 20))
    assert [name for name, _ in decisions] == ["localhost", "ip6-localhost"]


@pytest.mark.parametrize(
    "message",
    [b"", b"\x00" * 11, query("a")[:-3], query("x" * 64), struct.pack(">HHHHHH", 1, 0x8100, 1, 0, 0, 0)],
)
def test_malformed_queries(message: bytes) -> None:
    with pytest.raises(BadQuery):
        parse_query(message)


def test_answer_echoes_id_and_question() -> None:
    question = parse_query(query("pypi.org", qid=0xBEEF))
    reply = build_answer(question, 0, ["151.101.0.223", "2a04:4e42::223"])
    assert reply[:2] == b"\xbe\xef"
    assert answers(reply) == (0, ["151.101.0.223"])  # an A question gets only IPv4 addresses
