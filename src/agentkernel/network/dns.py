"""DNS answered by the egress gateway, over TCP (the only transport QEMU forwards to the host).

The guest's resolver asks 10.0.2.100:53 (`options use-vc` in its resolv.conf). Names the policy refuses
get REFUSED, and every answer is a policy decision in the audit log: the gateway normalises the name,
looks it up and judges it exactly as it does a proxied destination. Only A and AAAA questions are
answered; anything else gets an empty answer. Queries come from the guest: every length is checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agentkernel.network.hostnames import IPAddress

MAX_MESSAGE = 4096
TTL = 30
A, AAAA = 1, 28
NOERROR, FORMERR, REFUSED = 0, 1, 5
TIMEOUT = 30.0
MAX_CONNECTIONS = 32  # of one sandbox's resolver; one more is closed at once (fds are the process's)


# The question's name as sent -> the checked addresses, None if refused; audits the decision.
LookupFn = Callable[[str], Awaitable[list[IPAddress] | None]]


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
        try:
            label = message[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise BadQuery("label is not UTF-8") from None
        if "." in label:
            raise BadQuery("dot inside a label")
        labels.append(label)
        pos += length
    if pos + 4 > len(message):
        raise BadQuery("truncated question")
    qtype = struct.unpack_from(">H", message, pos)[0]
    name = ".".join(labels)
    if not name:
        raise BadQuery("empty name")
    return Question(qid, name, qtype, message[12 : pos + 4])


def build_answer(question: Question, rcode: int, addresses: list[IPAddress]) -> bytes:
    family = {A: ipaddress.IPv4Address, AAAA: ipaddress.IPv6Address}.get(question.qtype)
    records = [r for r in addresses if family is not None and isinstance(r, family)]
    header = struct.pack(">HHHHHH", question.id, 0x8180 | rcode, 1, len(records), 0, 0)
    answers = b"".join(
        struct.pack(">HHHIH", 0xC00C, question.qtype, 1, TTL, len(r.packed)) + r.packed for r in records
    )
    return header + question.raw + answers


def error_answer(message: bytes, rcode: int) -> bytes:
    qid = struct.unpack_from(">H", message)[0] if len(message) >= 2 else 0
    return struct.pack(">HHHHHH", qid, 0x8180 | rcode, 0, 0, 0, 0)


class Resolver:
    """What the gateway answers DNS with: the addresses its policy checked, or REFUSED."""

    def __init__(self, lookup: LookupFn) -> None:
        self.lookup = lookup
        self.connections = 0

    async def answer(self, message: bytes) -> bytes:
        try:
            question = parse_query(message)
        except BadQuery:
            return error_answer(message, FORMERR)
        if question.qtype not in (A, AAAA):
            return build_answer(question, NOERROR, [])
        addresses = await self.lookup(question.name)
        if addresses is None:
            return build_answer(question, REFUSED, [])
        return build_answer(question, NOERROR, addresses)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
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
            self.connections -= 1
            writer.close()
