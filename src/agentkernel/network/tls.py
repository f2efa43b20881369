"""Reading a TLS ClientHello from a tunnel, whole, and its server name.

A client may split its ClientHello over many writes and over several TLS records; the gateway reads
every record the message spans before it decides, and forwards those records verbatim. The bytes come
from the guest: every length is checked, and anything unexpected is BadHello, never another exception.
"""

from __future__ import annotations

import asyncio
import struct

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME = 0x0000
HOST_NAME = 0x00
MAX_RECORD = 1 << 14  # TLSPlaintext.length limit (RFC 8446 5.1)
MAX_HELLO = 1 << 14  # bytes of ClientHello body read at most; real ones are a few KiB


class BadHello(Exception):
    """Not a well-formed ClientHello; the message says why."""


async def read_client_hello(reader: asyncio.StreamReader, first: bytes = b"") -> tuple[bytes, str | None]:
    """Read the records holding a ClientHello (`first`: up to 5 bytes of it already read); return them as read
    and the server name it carries, None if it carries none. Raises BadHello, IncompleteReadError."""
    records, message = bytearray(), bytearray()
    while True:
        header = first + await reader.readexactly(5 - len(first))
        first = b""
        kind, major, length = header[0], header[1], struct.unpack_from(">H", header, 3)[0]
        if kind != HANDSHAKE or major != 3:
            raise BadHello("not a TLS handshake record")
        if not 0 < length <= MAX_RECORD:
            raise BadHello(f"bad record length {length}")
        fragment = await reader.readexactly(length)
        records += header + fragment
        message += fragment
        if len(message) < 4:
            continue
        if message[0] != CLIENT_HELLO:
            raise BadHello("the first handshake message is not a ClientHello")
        size = 4 + int.from_bytes(message[1:4], "big")
        if size > 4 + MAX_HELLO:
            raise BadHello(f"ClientHello of {size} bytes is too large")
        if len(message) > size:
            raise BadHello("data after the ClientHello in its record")
        if len(message) == size:
            return bytes(records), server_name(bytes(message[4:]))


def server_name(body: bytes) -> str | None:
    """The host_name in a ClientHello body's server_name extension, None if it has none."""
    cursor = _Cursor(body)
    cursor.take(2 + 32)  # legacy_version, random
    cursor.vector(1)  # legacy_session_id
    cursor.vector(2)  # cipher_suites
    cursor.vector(1)  # legacy_compression_methods
    if cursor.done():
        return None  # no extensions at all (allowed before TLS 1.3)
    extensions = _Cursor(cursor.vector(2))
    if not cursor.done():
        raise BadHello("data after the extensions")
    seen: set[int] = set()
    name = None
    while not extensions.done():
        kind = extensions.uint16()
        data = extensions.vector(2)
        if kind in seen:
            raise BadHello(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(data: bytes) -> str:
    """The one host_name in a server_name extension's ServerNameList."""
    names = _Cursor(_Cursor(data).whole_vector(2))
    if names.take(1)[0] != HOST_NAME:
        raise BadHello("server_name entry is not a host_name")
    raw = names.vector(2)
    if not names.done():
        raise BadHello("more than one server_name entry")
    if not raw or not raw.isascii():
        raise BadHello("server_name is empty or not ASCII")
    return raw.decode("ascii")


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def done(self) -> bool:
        return self.pos == len(self.data)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BadHello("truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def uint16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_size), "big"))

    def whole_vector(self, length_size: int) -> bytes:
        """A vector that must fill the rest of the data."""
        value = self.vector(length_size)
        if not self.done():
            raise BadHello("data after a vector")
        return value
