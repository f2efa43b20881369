"""DNS answered by the egress gateway, over TCP (the only transport QEMU forwards to the host).

The guest's resolver asks 10.0.2.100:53 (`options use-vc` in its resolv.conf). Names the policy refuses
get REFUSED, and every answer is a policy decision in the audit log. Only A and AAAA questions are
answered; anything else gets an empty answer. Queries come from the guest: every length is checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

MAX_MESSAGE = 4096
TTL = 30
A, AAAA = 1, 28
NOERROR, FORMERR, REFUSED = 0, 1, 5
TIMEOUT = 30.0


DecideFn = Callable[[str, list[str]], bool]  # (name, addresses) -> allowed; audits the decision


class BadQuery(Exception):
    pass


@dataclass(frozen=True)
class Question:
    id: int
    name: str
    qtype: int
    raw: bytes  # the question section as sent, echoed in the answer


def parse_query(message: bytes) -> Question:
    if len(message) < 12:
        raise BadQuery("short header")
    qid, flags, qdcount = struct.unpack_from(">HHH", message)
    if flags & 0x8000 or qdcount != 1:
        raise BadQuery("not a query with one question")
    labels, pos = [], 12
    while True:
        if pos >= len(message):
            raise BadQuery("truncated name")
        length = message[pos]
        pos += 1
        if length == 0:
            break
        if length > 63 or pos + length > len(message):
            raise BadQuery("bad label")
        labels.append(message[pos : pos + length].decode("ascii", errors="replace").lower())
        pos += length
    if pos + 4 > len(message):
        raise BadQuery("truncated question")
    qtype = struct.unpack_from(">H", message, pos)[0]
    name = ".".join(labels)
    if not name or len(name) > 253:
        raise BadQuery("bad name")
    return Question(qid, name, qtype, message[12 : pos + 4])


def build_answer(question: Question, rcode: int, addresses: list[str]) -> bytes:
    family = {A: ipaddress.IPv4Address, AAAA: ipaddress.IPv6Address}.get(question.qtype)
    records = [ipaddress.ip_address(a) for a in addresses]
    records = [r for r in records if family is not None and isinstance(r, family)]
    header = struct.pack(">HHHHHH", question.id, 0x8180 | rcode, 1, len(records), 0, 0)
    answers = b"".join(
        struct.pack(">HHHIH", 0xC00C, question.qtype, 1, TTL, len(r.packed)) + r.packed for r in records
    )
    return header + question.raw + answers


def error_answer(message: bytes, rcode: int) -> bytes:
    qid = struct.unpack_from(">H", message)[0] if len(message) >= 2 else 0
    return struct.pack(">HHHHHH", qid, 0x8180 | rcode, 0, 0, 0, 0)


class Resolver:
    """What the gateway answers DNS with: its own lookups, filtered by its policy."""

    def __init__(self, decide_and_audit: DecideFn) -> None:
        self.decide = decide_and_audit

    async def answer(self, message: bytes) -> bytes:
        try:
            question = parse_query(message)
        except BadQuery:
            return error_answer(message, FORMERR)
        if question.qtype not in (A, AAAA):
            return build_answer(question, NOERROR, [])
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(question.name, None, type=socket.SOCK_STREAM), TIMEOUT
            )
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        except (OSError, TimeoutError):
            addresses = []
        if not self.decide(question.name, addresses):
            return build_answer(question, REFUSED, [])
        return build_answer(question, NOERROR, addresses)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
                if size > MAX_MESSAGE:
                    return
                message = await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
                reply = await self.answer(message)
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
