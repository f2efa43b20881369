"""Frames and records of the guest protocol, as docs/protocol.md defines them.

Everything here parses bytes that come from an untrusted guest: every length is checked against the
protocol's limits before anything is buffered, and any violation raises ProtocolError. On the standard
library's cheapest modules only (no dataclasses, no typing): the thin command line imports it.
"""

from __future__ import annotations

import itertools
import struct
from enum import IntEnum

from agentkernel.errors import ProtocolError as ProtocolError  # raised here; re-exported for callers

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence

HEADER = struct.Struct(">IHBB")
FIELD = struct.Struct(">HI")
MAX_PAYLOAD = 256 * 1024
MAX_FIELDS = 4096
MAX_CHANNELS = 1024
INITIAL_WINDOW = 256 * 1024
MAX_PING = 64
MAGIC = b"AGENTKRN"
VERSION = 4
"""This side's protocol version. Version 2 added ARGS, which continues an EXEC too big for one frame;
version 3 background commands (EXEC `detach`, JOBS, ATTACH, INPUT, KILL, WAIT), RENAME and WATCH;
version 4 CONNECT, a TCP connection to a port of the guest's loopback."""
OLDEST_VERSION = 1
"""The oldest agent the host still talks to (sandboxes keep the agent of the image they came from)."""
ARGS_VERSION = 2
"""The first agent version that takes ARGS frames."""
BACKGROUND_VERSION = 3
"""The first agent version with background commands, RENAME and WATCH."""
PORTS_VERSION = 4
"""The first agent version that takes CONNECT."""
ARG_MAX = 2 << 20
"""Most bytes of a command's argv and env as Linux's execve counts them: each string with its NUL,
plus a pointer (ARG_POINTER bytes) to each. It is a quarter of the guest's 8 MiB stack limit."""
MAX_ARG_STRLEN = 128 << 10
"""Most bytes of one argv or env string with its NUL (Linux: 32 pages)."""
ARG_POINTER = 8


class FrameType(IntEnum):
    HELLO = 1
    PING = 2
    PONG = 3
    SHUTDOWN = 4
    EXEC = 16
    STARTED = 17
    STDIN = 18
    STDOUT = 19
    STDERR = 20
    EXIT = 21
    SIGNAL = 22
    RESIZE = 23
    WINDOW = 24
    ERROR = 25
    DATA = 26
    OK = 27
    INFO = 28
    ENTRY = 29
    ARGS = 30
    GET = 32
    PUT = 33
    STAT = 34
    LIST = 35
    MKDIR = 36
    REMOVE = 37
    RENAME = 38
    WATCH = 39
    JOBS = 48
    ATTACH = 49
    INPUT = 50
    KILL = 51
    WAIT = 52
    CONNECT = 53


DATA_TYPES = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR, FrameType.DATA})
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


class Tag(IntEnum):
    VERSION = 1
    MAGIC = 2
    ARGV = 3
    ENV = 4
    CWD = 5
    UID = 6
    GID = 7
    TIMEOUT_MS = 8
    PID = 9
    EXIT_CODE = 10
    SIGNAL = 11
    MESSAGE = 12
    ERRNO = 13
    ROWS = 14
    COLS = 15
    PTY = 16
    BYTES = 17
    TIMED_OUT = 18
    HOSTNAME = 19
    TIME_NS = 20
    PATH = 21
    MODE = 22
    SIZE = 23
    MTIME_NS = 24
    KIND = 25
    NAME = 26
    PARENTS = 27
    RECURSIVE = 28
    MAX_PROCS = 29
    MEMORY_MB = 30
    ENTROPY = 31
    CONTINUED = 32
    DETACH = 33
    CMD = 34
    OFFSET = 35
    FOLLOW = 36
    STATE = 37
    STARTED_NS = 38
    DATA = 39
    EOF = 40
    CAUSE = 41
    TO = 42
    LOST = 43
    EVENT = 44
    PORT = 45


class Frame:
    """One frame: the channel it is on, its type and its payload."""

    __slots__ = ("channel", "payload", "type")

    def __init__(self, channel: int, type: FrameType, payload: bytes) -> None:
        self.channel = channel
        self.type = type
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.channel, self.type, self.payload) == (other.channel, other.type, other.payload)

    def __hash__(self) -> int:
        return hash((self.channel, self.type, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.channel}, {self.type.name}, {self.payload[:32]!r})"


def encode(channel: int, ftype: FrameType, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), channel, ftype, 0) + payload


FieldValue = int | bytes | str


def encode_record(fields: list[tuple[Tag, FieldValue]]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        if isinstance(value, bool | int):
            data = int(value).to_bytes(8, "big", signed=True)
        elif isinstance(value, str):
            data = value.encode()
        else:
            data = value
        out += FIELD.pack(tag, len(data)) + data
    return bytes(out)


_CONTINUED = FIELD.size + 8
"""Room for the `continued` field that ends every record of a request but its last."""


def exec_records(
    head: list[tuple[Tag, FieldValue]], argv: Sequence[bytes], env: Sequence[bytes]
) -> list[bytes]:
    """The records of an EXEC: the EXEC record (`head`, then as many argv and env fields as fit), then
    the ARGS records that carry the rest, in order. Each fits in a frame and holds at most MAX_FIELDS
    fields; all but the last end with `continued`=1. Callers bound each string by MAX_ARG_STRLEN."""
    records: list[bytes] = []
    current = bytearray(encode_record(head))
    count = len(head)
    strings = itertools.chain(((Tag.ARGV, a) for a in argv), ((Tag.ENV, e) for e in env))
    for tag, value in strings:
        size = FIELD.size + len(value)
        if len(current) + size + _CONTINUED > MAX_PAYLOAD or count + 2 > MAX_FIELDS:
            if size + _CONTINUED > MAX_PAYLOAD:
                raise ValueError(f"an {tag.name.lower()} string of {len(value)} bytes fits no frame")
            current += encode_record([(Tag.CONTINUED, 1)])
            records.append(bytes(current))
            current, count = bytearray(), 0
        current += FIELD.pack(tag, len(value)) + value
        count += 1
    records.append(bytes(current))
    return records


class Record:
    """A parsed record: the raw values of each tag, in order. Typed getters validate on access."""

    def __init__(self, fields: dict[int, list[bytes]] | None = None) -> None:
        self.fields: dict[int, list[bytes]] = fields if fields is not None else {}

    def all(self, tag: Tag) -> list[bytes]:
        return self.fields.get(tag, [])

    def bytes(self, tag: Tag, default: bytes | None = None) -> bytes | None:
        values = self.fields.get(tag)
        return values[-1] if values else default

    def int(self, tag: Tag, default: int | None = None) -> int | None:
        raw = self.bytes(tag)
        if raw is None:
            return default
        if len(raw) != 8:
            raise ProtocolError(f"field {tag.name.lower()} is {len(raw)} bytes, an int must be 8")
        return int.from_bytes(raw, "big", signed=True)

    def str(self, tag: Tag, default: str = "") -> str:
        raw = self.bytes(tag)
        return default if raw is None else raw.decode("utf-8", errors="replace").replace("\0", "")


def decode_record(payload: bytes) -> Record:
    record = Record()
    offset = count = 0
    while offset < len(payload):
        if len(payload) - offset < FIELD.size:
            raise ProtocolError("truncated record field header")
        tag, size = FIELD.unpack_from(payload, offset)
        offset += FIELD.size
        if size > len(payload) - offset:
            raise ProtocolError(f"record field {tag} claims {size} bytes, only {len(payload) - offset} left")
        count += 1
        if count > MAX_FIELDS:
            raise ProtocolError(f"record has more than {MAX_FIELDS} fields")
        record.fields.setdefault(tag, []).append(payload[offset : offset + size])
        offset += size
    return record


class FrameDecoder:
    """Splits a byte stream into frames. Holds at most one frame's worth of bytes.

    With `hunt_hello`, bytes before the first HELLO frame carrying the protocol magic are skipped:
    a virtio-serial port can still hold output meant for an earlier client (docs/protocol.md).
    """

    def __init__(self, *, hunt_hello: bool = False) -> None:
        self._buf = bytearray()
        self._hunting = hunt_hello

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        if self._hunting and not self._hunt():
            return []
        frames = []
        while len(self._buf) >= HEADER.size:
            length, channel, ftype, flags = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
            if flags != 0:
                raise ProtocolError(f"frame flags {flags:#x} are not 0")
            if ftype not in _KNOWN_TYPES:
                raise ProtocolError(f"unknown frame type {ftype}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(channel, FrameType(ftype), bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return frames

    def _hunt(self) -> bool:
        """Drop bytes up to the first complete HELLO with the magic; False while none is found yet."""
        start = 0
        while (i := self._buf.find(_HELLO_HEADER_TAIL, start)) != -1:
            frame_start = i - 4
            start = i + 1
            if frame_start < 0:
                continue
            length = int.from_bytes(self._buf[frame_start:i], "big")
            if length > MAX_HELLO:
                continue
            end = i + 4 + length
            if end > len(self._buf):
                del self._buf[:frame_start]  # maybe the HELLO, still arriving
                return False
            try:
                if decode_record(bytes(self._buf[i + 4 : end])).bytes(Tag.MAGIC) == MAGIC:
                    del self._buf[:frame_start]
                    self._hunting = False
                    return True
            except ProtocolError:
                pass
        del self._buf[: max(0, len(self._buf) - 8)]  # keep what could begin a header
        return False

    @property
    def buffered(self) -> int:
        return len(self._buf)


MAX_HELLO = 4096
_HELLO_HEADER_TAIL = bytes([0, 0, FrameType.HELLO, 0])  # channel 0, type HELLO, flags 0
