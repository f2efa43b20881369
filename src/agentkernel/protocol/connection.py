"""An asyncio connection to a guest agent: HELLO, PING, EXEC with streamed I/O, background commands,
file operations and watches, TCP connections to guest ports, SHUTDOWN.

One reader task per connection demultiplexes frames to channels. Each channel's inbound data is bounded
by the window this side granted; more than that is a protocol violation that breaks the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from errno import EAGAIN, EBUSY, ENAMETOOLONG, ENOENT
from pathlib import Path
from typing import Any

from agentkernel.errors import (
    AgentConnectionError,
    AgentkernelError,
    ArgumentsTooLongError,
    BackgroundCommandError,
    FileOpError,
    GuestPortError,
    ProtocolError,
    SandboxStateError,
)
from agentkernel.protocol.frames import (
    ARG_MAX,
    ARGS_VERSION,
    BACKGROUND_VERSION,
    DATA_TYPES,
    FIELD,
    INITIAL_WINDOW,
    MAX_CHANNELS,
    MAX_PAYLOAD,
    MAX_PING,
    PORTS_VERSION,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    Record,
    Tag,
    decode_record,
    encode,
    encode_record,
    exec_records,
)
from agentkernel.protocol.requests import (
    HELLO_RETRY,
    PATH_MAX,
    RESYNC,
    RESYNC_AFTER,
    START_TIMEOUT,
    TIMEOUT_GRACE,
    WINDOW_GRANT_STEP,
    check_arguments,
    exec_error,
    exec_fields,
    exit_fields,
    hello_frame,
    hello_version,
    new_command_id,
    raw,
    shell_code,
)

VSOCK_PORT = 52000
FIELD_HEADER = FIELD.size
READ_CHUNK = 64 * 1024
CLOSE_TIMEOUT = 2.0
"""Seconds `close` waits for what was sent to be written before it drops it."""
HEARTBEAT_INTERVAL = 5.0
"""Seconds of silence from the agent after which a heartbeat connection sends a PING."""
HEARTBEAT_TIMEOUT = 10.0
"""Seconds after that PING within which something must come back, or the connection is given up.
Firecracker resets its vsock device on every snapshot: the guest drops its connections (and the
agent kills their commands), while the host end stays open and carries nothing."""
HEARTBEAT_NONCE = b"agentkernel heartbeat"
ENDING_TYPES = (FrameType.EXIT, FrameType.ERROR, FrameType.OK)
FILE_REPLIES = frozenset({FrameType.OK, FrameType.ERROR})
REPLIES = {
    FrameType.EXEC: frozenset(
        {FrameType.STARTED, FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT, FrameType.ERROR}
    ),
    FrameType.GET: frozenset({FrameType.INFO, FrameType.DATA, *FILE_REPLIES}),
    FrameType.LIST: frozenset({FrameType.ENTRY, *FILE_REPLIES}),
    FrameType.JOBS: frozenset({FrameType.ENTRY, *FILE_REPLIES}),
    FrameType.ATTACH: frozenset({FrameType.STARTED, FrameType.STDOUT, FrameType.EXIT, *FILE_REPLIES}),
    FrameType.WAIT: frozenset({FrameType.EXIT, FrameType.ERROR}),
    FrameType.WATCH: frozenset({FrameType.STARTED, FrameType.DATA, *FILE_REPLIES}),
    FrameType.CONNECT: frozenset({FrameType.STARTED, FrameType.DATA, *FILE_REPLIES}),
}
"""The frames the agent may send on a channel, by the operation that opened it (PUT, STAT, MKDIR,
REMOVE, RENAME, INPUT, KILL, and an EXEC with `detach`: FILE_REPLIES). Each may come once, but for
data and ENTRY; an empty DATA (the end of a GET's data) once too."""
MAX_JOBS = 1024
"""Most background commands the host takes in a JOBS answer (the agent keeps 64)."""
INPUT_CHUNK = 64 * 1024
"""Most stdin bytes in one INPUT request."""
INPUT_RETRY = 0.05
"""Seconds between tries of an INPUT that the agent refused because the command's stdin is full."""
MAX_EVENT_FIELD = PATH_MAX + 64
"""Longest field of a WATCH event (a path relative to the watched directory)."""
EVENTS = {
    1: "create",
    2: "write",
    3: "remove",
    4: "moved_from",
    5: "moved_to",
    6: "chmod",
    7: "overflow",
    8: "gone",
}
"""The `event` codes of WATCH (docs/protocol.md, Files)."""
STALLED_ATTACHES = 8
"""Times in a row an attach may fall behind the agent's ring without getting a byte before the host
takes the agent for broken (a real agent sends output before it can fall behind)."""


Observer = Callable[[str, dict[str, Any]], None]
"""Told of each finished operation: ("exec", {argv, exit_code, ...}), ("file_read", {path, size}), ..."""

CommandEnv = Callable[[str], Mapping[str, str]]
"""What a command gets, given its id (`new_command_id`), over `Connection.default_env`."""

Explain = Callable[[AgentConnectionError], Awaitable[AgentConnectionError]]
"""The error a lost connection's waiters get, given the one the connection saw."""


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int | None
    signal: int | None
    timed_out: bool

    @property
    def shell_code(self) -> int:
        """The exit code a shell would report: the code, or 128+N when killed by signal N."""
        return shell_code(self.exit_code, self.signal)


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    data: bytes


class _Inbox:
    """A channel's frames that its reader has not taken yet. Data that arrives behind unread data of the
    same type is appended to it: unread data costs its bytes, which the window bounds, and not an object
    per frame, which the window does not."""

    def __init__(self, channel: int) -> None:
        self._channel = channel
        self._items: deque[Frame | tuple[FrameType, bytearray] | None] = deque()
        self._ready = asyncio.Event()

    def put(self, frame: Frame | None) -> None:
        last = self._items[-1] if self._items else None
        if frame is not None and frame.type in DATA_TYPES and frame.payload and last is not None:
            if isinstance(last, tuple) and last[0] is frame.type:
                last[1].extend(frame.payload)
                return
            if isinstance(last, Frame) and last.type is frame.type and last.payload:
                self._items[-1] = (frame.type, bytearray(last.payload) + frame.payload)
                return
        self._items.append(frame)
        self._ready.set()

    async def get(self) -> Frame | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self.get_nowait()

    def get_nowait(self) -> Frame | None:
        item = self._items.popleft()
        return Frame(self._channel, item[0], bytes(item[1])) if isinstance(item, tuple) else item

    def empty(self) -> bool:
        return not self._items


class _Channel:
    def __init__(self, conn: Connection, cid: int, op: FrameType, *, detach: bool = False) -> None:
        self.conn = conn
        self.id = cid
        self.op = op
        self.replies = FILE_REPLIES if detach else REPLIES.get(op, FILE_REPLIES)
        self.frames = _Inbox(cid)
        self.recv_window = INITIAL_WINDOW
        self.consumed = 0
        self.send_window = INITIAL_WINDOW
        self.send_ready = asyncio.Event()
        self.send_ready.set()
        self.closed = False
        self.abandoned = False
        self.ended_once = False
        self.seen: set[FrameType] = set()  # those of the frames that may come once that did

    @property
    def is_exec(self) -> bool:
        return self.op is FrameType.EXEC

    async def next(self) -> Frame:
        frame = await self.frames.get()
        if frame is None:
            raise self.conn.failure()
        if frame.type in DATA_TYPES:
            await self._consumed(len(frame.payload))
        return frame

    async def _consumed(self, n: int) -> None:
        self.consumed += n
        if self.consumed >= WINDOW_GRANT_STEP and not self.closed:
            grant, self.consumed = self.consumed, 0
            self.recv_window += grant
            await self.conn.send(self.id, FrameType.WINDOW, encode_record([(Tag.BYTES, grant)]))

    async def send_data(self, ftype: FrameType, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self.send_window <= 0:
                self.send_ready.clear()
                await self.send_ready.wait()
                if self.conn.broken:
                    raise self.conn.failure()
            n = min(len(view), self.send_window, MAX_PAYLOAD)
            self.send_window -= n
            await self.conn.send(self.id, ftype, bytes(view[:n]))
            view = view[n:]


class Process:
    """A command running in the guest."""

    def __init__(
        self, channel: _Channel, pid: int, argv: list[str], *, timeout: float | None, command: str
    ) -> None:
        self._ch = channel
        self.pid = pid
        self.argv = argv
        self.command = command  # its id
        self._started = time.monotonic()
        self._give_up_at = None if not timeout else self._started + timeout + TIMEOUT_GRACE
        self._status: ExitStatus | None = None

    async def write(self, data: bytes) -> None:
        if data:
            await self._ch.send_data(FrameType.STDIN, data)

    async def close_stdin(self) -> None:
        await self._ch.conn.send(self._ch.id, FrameType.STDIN, b"")

    async def signal(self, signo: int) -> None:
        await self._ch.conn.send(self._ch.id, FrameType.SIGNAL, encode_record([(Tag.SIGNAL, signo)]))

    async def resize(self, rows: int, cols: int) -> None:
        record = encode_record([(Tag.ROWS, rows), (Tag.COLS, cols)])
        await self._ch.conn.send(self._ch.id, FrameType.RESIZE, record)

    async def output(self) -> AsyncIterator[Output]:
        """Output as the process produces it, until it exits; then `status` is set."""
        while self._status is None:
            frame = await self._next()
            if frame.type is FrameType.STDOUT:
                yield Output("stdout", frame.payload)
            elif frame.type is FrameType.STDERR:
                yield Output("stderr", frame.payload)
            elif frame.type is FrameType.EXIT:
                self._status = status = _exit_status(decode_record(frame.payload))
                self._ch.conn.release(self._ch)
                self._ch.conn.notify(
                    "exec",
                    argv=self.argv,
                    command=self.command,
                    exit_code=status.exit_code,
                    signal=status.signal,
                    timed_out=status.timed_out,
                    duration_s=round(time.monotonic() - self._started, 3),
                )
            elif frame.type is FrameType.ERROR:
                self._ch.conn.release(self._ch)
                error = exec_error(decode_record(frame.payload))
                self._ch.conn.notify("exec", argv=self.argv, command=self.command, error=str(error))
                raise error
            elif frame.type is not FrameType.WINDOW:
                raise self._ch.conn.violation(f"unexpected {frame.type.name} frame during exec")

    async def _next(self) -> Frame:
        """The next frame. Past the command's timeout and its grace, waiting for the agent stops."""
        if self._give_up_at is None or not self._ch.frames.empty():
            return await self._ch.next()
        try:
            async with asyncio.timeout(self._give_up_at - time.monotonic()):
                return await self._ch.next()
        except TimeoutError:
            self.abandon()
            raise AgentConnectionError(
                f"the agent did not end the command within {TIMEOUT_GRACE:g}s of its timeout"
            ) from None

    def abandon(self) -> None:
        """Kill the process (its whole group) and drop whatever it still sends, without waiting."""
        if self._status is None:
            self._ch.conn.abandon(self._ch)

    async def wait(self) -> ExitStatus:
        async for _ in self.output():
            pass
        assert self._status is not None
        return self._status

    @property
    def status(self) -> ExitStatus | None:
        return self._status


@dataclass(frozen=True)
class BackgroundCommand:
    """A command started with `Connection.exec_background`: its id in the guest, and its pid."""

    id: int
    pid: int


@dataclass(frozen=True)
class BackgroundInfo:
    """One background command as `Connection.list_background` reports it.

    `output_size` is the bytes of output (stdout and stderr together) it has written; the guest keeps
    the last 1 MiB of them: `output_lost` bytes at the start are gone (0 unless the ring overflowed).
    `status` is set once it has ended. `argv` may be cut short (the agent keeps 512 bytes of it)."""

    id: int
    pid: int
    argv: list[str]
    running: bool
    started_ns: int
    output_size: int
    output_lost: int
    status: ExitStatus | None


@dataclass(frozen=True)
class BackgroundOutput:
    """Output of a background command from byte `offset` of all it wrote; `lost` bytes right before
    it are gone (the guest's ring overflowed before they were read): a marker to show the reader."""

    offset: int
    data: bytes
    lost: int = 0


class Attachment:
    """A reader of a background command's output (`Connection.attach_background`)."""

    def __init__(self, conn: Connection, cmd_id: int, offset: int, follow: bool) -> None:
        self._conn = conn
        self.id = cmd_id
        self.offset = offset
        """The offset of the next byte to read."""
        self.follow = follow
        self.pid = -1
        self.status: ExitStatus | None = None
        """Set once the command ended and all its output was read."""
        self._channel: _Channel | None = None
        self._lost = 0

    async def _open(self) -> None:
        fields: list[tuple[Tag, int | bytes | str]] = [
            (Tag.CMD, self.id),
            (Tag.OFFSET, self.offset),
            (Tag.FOLLOW, int(self.follow)),
        ]
        channel = await self._conn._file_op(FrameType.ATTACH, fields)
        try:
            frame = await channel.next()
        except BaseException:
            self._conn.abandon(channel)
            raise
        if frame.type is not FrameType.STARTED:
            await self._conn._finish(channel, frame, BackgroundCommandError)
            raise self._conn.violation("ATTACH answered with OK before STARTED")
        record = decode_record(frame.payload)
        start = record.int(Tag.OFFSET, 0) or 0
        if start < 0:
            raise self._conn.violation(f"ATTACH starts at offset {start}")
        self._lost += max(0, start - self.offset)
        self.offset = start
        self.pid = record.int(Tag.PID, -1) or -1
        self._channel = channel

    async def output(self) -> AsyncIterator[BackgroundOutput]:
        """The output from `offset` on, as it comes: until the command ends (then `status` is set), or
        without `follow`, until what it has written so far was read. Where the guest's ring dropped
        bytes before they were read, the next chunk says how many (`lost`)."""
        stalled = 0
        try:
            while True:
                if self._channel is None:
                    await self._open()
                channel = self._channel
                assert channel is not None
                frame = await channel.next()
                if frame.type is FrameType.STDOUT:
                    stalled = 0
                    yield BackgroundOutput(self.offset, frame.payload, self._lost)
                    self.offset += len(frame.payload)
                    self._lost = 0
                    continue
                if frame.type is FrameType.WINDOW:
                    continue
                self._channel = None
                record = await self._conn._finish(channel, frame, BackgroundCommandError, ok=FrameType.EXIT)
                if frame.type is FrameType.EXIT:
                    self.status = _exit_status(record)
                    return
                if record.int(Tag.LOST) is None:  # caught up, not following
                    return
                stalled += 1  # fell behind the ring: attach again from where it is
                if stalled > STALLED_ATTACHES:
                    raise self._conn.violation("ATTACH keeps falling behind without sending output")
        finally:
            if self._channel is not None:
                self._conn.abandon(self._channel)
                self._channel = None

    def close(self) -> None:
        """Stop reading (the command runs on)."""
        if self._channel is not None:
            self._conn.abandon(self._channel)
            self._channel = None


@dataclass(frozen=True)
class FileEvent:
    """A change under a watched directory. `name` is relative to it ("" for the directory itself);
    `event` is one of "create", "write" (a file written and closed), "remove", "moved_from",
    "moved_to", "chmod" (attributes), "overflow" (the guest dropped events: re-list to catch up) and
    "gone" (the directory itself was removed or moved: the last event)."""

    name: str
    kind: str  # "file" or "dir"
    event: str


class Watch:
    """The events of `Connection.watch`, as they come."""

    def __init__(self, conn: Connection, channel: _Channel) -> None:
        self._conn = conn
        self._channel: _Channel | None = channel
        self._buf = bytearray()

    def _parse(self) -> list[FileEvent]:
        """Complete events from the buffered bytes: fields, each event ending with its `event`."""
        events: list[FileEvent] = []
        fields: dict[int, bytes] = {}
        offset = 0
        while len(self._buf) - offset >= FIELD_HEADER:
            tag = int.from_bytes(self._buf[offset : offset + 2], "big")
            size = int.from_bytes(self._buf[offset + 2 : offset + 6], "big")
            if size > MAX_EVENT_FIELD:
                raise self._conn.violation(f"a WATCH event field of {size} bytes")
            if len(self._buf) - offset - FIELD_HEADER < size:
                break
            value = bytes(self._buf[offset + FIELD_HEADER : offset + FIELD_HEADER + size])
            offset += FIELD_HEADER + size
            fields[tag] = value
            if tag != Tag.EVENT:
                continue
            record = Record({t: [v] for t, v in fields.items()})
            events.append(
                FileEvent(
                    name=record.str(Tag.NAME),
                    kind=KINDS.get(record.int(Tag.KIND, 4) or 4, "other"),
                    event=EVENTS.get(record.int(Tag.EVENT, 0) or 0, "other"),
                )
            )
            del self._buf[:offset]
            offset = 0
            fields = {}
        if len(fields) > 8:
            raise self._conn.violation("a WATCH event of more than 8 fields")
        return events

    async def events(self) -> AsyncIterator[FileEvent]:
        """Events until the directory is gone (the "gone" event) or `close`. What the reader does
        not take stays in the guest (bounded there; past that an "overflow" event says so)."""
        try:
            while self._channel is not None:
                frame = await self._channel.next()
                if frame.type is FrameType.DATA:
                    self._buf += frame.payload
                    for event in self._parse():
                        yield event
                    continue
                if frame.type is FrameType.WINDOW:
                    continue
                channel, self._channel = self._channel, None
                await self._conn._finish(channel, frame)
        finally:
            self.close()

    def close(self) -> None:
        """Stop watching."""
        if self._channel is not None:
            self._conn.abandon(self._channel)
            self._channel = None


class TcpStream:
    """A TCP connection to a port of the guest's loopback (`Connection.open_tcp`): bytes both ways,
    each direction under the channel's window, so neither side holds more than a window of the
    other's data however slowly it is read."""

    def __init__(self, conn: Connection, channel: _Channel, port: int) -> None:
        self._conn = conn
        self._channel = channel
        self.port = port
        self._eof = False
        self._ended = False

    async def read(self) -> bytes:
        """The next bytes the guest's server sent; b"" once it ended its side. GuestPortError if the
        connection failed in the guest (the server reset it)."""
        while not self._eof:
            frame = await self._channel.next()
            if frame.type is FrameType.DATA and frame.payload:
                return frame.payload
            self._eof = True
            if frame.type is not FrameType.DATA:
                await self._end(frame)
        return b""

    async def write(self, data: bytes) -> None:
        """Send `data` to the guest's server; waits while the guest has not passed on what it got."""
        if self._ended:
            raise GuestPortError(f"the connection to port {self.port} in the sandbox has ended", None)
        if data:
            await self._channel.send_data(FrameType.DATA, data)

    async def close_write(self) -> None:
        """End this side's data: the guest half-closes the connection (its server reads end of file)."""
        if not self._ended:
            await self._conn.send(self._channel.id, FrameType.DATA, b"")

    async def wait_closed(self) -> None:
        """After both sides ended their data: wait for the guest to close the connection."""
        while not self._ended:
            frame = await self._channel.next()
            if frame.type is FrameType.DATA:
                self._eof = self._eof or not frame.payload
                continue
            await self._end(frame)

    async def _end(self, frame: Frame) -> None:
        self._ended = True
        await self._conn._finish(self._channel, frame, GuestPortError)

    def close(self) -> None:
        """Drop the connection at once (the guest closes its socket); nothing more is read."""
        self._ended = True
        self._conn.abandon(self._channel)


@dataclass(frozen=True)
class FileInfo:
    name: str
    kind: str  # "file", "dir", "symlink" or "other"
    size: int
    mode: int
    mtime_ns: int


KINDS = {1: "file", 2: "dir", 3: "symlink", 4: "other"}


def _file_info(record: Record, name: str = "") -> FileInfo:
    raw_name = record.bytes(Tag.NAME)
    return FileInfo(
        name=raw_name.decode(errors="replace") if raw_name is not None else name,
        kind=KINDS.get(record.int(Tag.KIND, 4) or 4, "other"),
        size=max(0, record.int(Tag.SIZE, 0) or 0),
        mode=(record.int(Tag.MODE, 0) or 0) & 0o7777,
        mtime_ns=record.int(Tag.MTIME_NS, 0) or 0,
    )


@dataclass(frozen=True)
class Completed:
    status: ExitStatus
    stdout: bytes
    stderr: bytes


class Connection:
    """One connection to an agent. Use `open_unix` / `open_firecracker` / `open_vsock`, then `hello`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        shared_stream: bool = False,
        heartbeat: bool = False,
    ) -> None:
        """`shared_stream`: a virtio-serial port, whose byte stream earlier clients used too.
        `heartbeat`: once greeted, PING a silent agent and break the connection when nothing comes
        back in time (HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT): a transport whose host end can
        outlive the guest's (Firecracker's vsock)."""
        self._reader = reader
        self._writer = writer
        self._shared = shared_stream
        self._decoder = FrameDecoder(hunt_hello=shared_stream)
        self._channels: dict[int, _Channel] = {}
        self._next_id = 1
        self._control: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=16)
        self._write_lock = asyncio.Lock()
        self._error: AgentConnectionError | None = None
        self.agent_info = ""
        self.agent_version = 0
        self._greeted = False
        self.default_env: dict[str, str] = {}  # under what exec is given; its env wins
        self.command_env: CommandEnv | None = None  # over default_env, under what exec is given
        self.observer: Observer | None = None
        self.explain: Explain | None = None
        """Words the error of a lost connection before any waiter sees it (e.g. "the sandbox ended,
        and why"): set by whoever knows what is behind the connection."""
        self._explaining: asyncio.Task[None] | None = None
        self._heartbeat = heartbeat
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._last_heard = time.monotonic()
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open_unix(cls, path: Path, *, timeout: float = 10.0, shared_stream: bool = False) -> Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        except (OSError, TimeoutError) as exc:
            raise AgentConnectionError(f"cannot connect to the sandbox agent at {path}: {exc}") from None
        return cls(reader, writer, shared_stream=shared_stream)

    @classmethod
    async def open_firecracker(
        cls, uds: Path, port: int = VSOCK_PORT, *, timeout: float = 10.0
    ) -> Connection:
        """Firecracker's hybrid vsock: connect to its Unix socket and ask for the guest port. The
        handshake is read before the Connection (whose reader task owns the stream) exists."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(uds)), timeout)
        except (OSError, TimeoutError) as exc:
            raise AgentConnectionError(f"cannot connect to the vsock socket {uds}: {exc}") from None
        writer.write(f"CONNECT {port}\n".encode())
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            writer.close()
            raise AgentConnectionError(f"vsock CONNECT {port} via {uds} failed: {exc!r}") from None
        if not line.startswith(b"OK "):
            writer.close()
            raise AgentConnectionError(f"vsock CONNECT {port} via {uds} refused (no agent listening yet)")
        return cls(reader, writer, heartbeat=True)

    @classmethod
    async def open_vsock(cls, cid: int, port: int = VSOCK_PORT, *, timeout: float = 10.0) -> Connection:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (cid, port)), timeout)
            reader, writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise AgentConnectionError(f"cannot connect to vsock {cid}:{port}: {exc}") from None
        return cls(reader, writer)

    # -- control channel ------------------------------------------------------------------

    async def hello(
        self,
        *,
        hostname: str | None = None,
        set_clock: bool = True,
        timeout: float = 30,
        max_procs: int | None = None,
        memory_mb: int | None = None,
    ) -> str:
        """Greet the agent. `max_procs` and `memory_mb` limit the guest's processes (protocol.md)."""
        hello = hello_frame(
            hostname=hostname, set_clock=set_clock, max_procs=max_procs, memory_mb=memory_mb, version=VERSION
        )
        try:
            async with asyncio.timeout(timeout):
                frame = await self._hello_answer(hello)
        except TimeoutError:
            # Given up, and with it whatever the guest did not read: a guest that never reads would
            # otherwise keep the connection, and the task reading it, for good.
            self._fail(AgentConnectionError(f"the agent did not answer within {timeout:g}s"))
            raise self.failure() from None
        self._greeted = True
        if self._heartbeat and self._heartbeat_task is None:
            self._heartbeat_task = asyncio.create_task(self._beat())
        while not self._control.empty():  # answers to repeated HELLOs that came with the first
            self._control.get_nowait()
        if self.broken:
            raise self.failure()
        record = decode_record(frame.payload)
        try:
            self.agent_version = hello_version(record, VERSION)
        except ProtocolError as exc:
            raise self.violation(exc.what) from None
        self.agent_info = record.str(Tag.MESSAGE)
        return self.agent_info

    async def _hello_answer(self, hello: bytes) -> Frame:
        """Send `hello` until the agent answers. A serial port drops what arrives while the guest has
        it closed, so HELLO is repeated; the agent answers each one it sees."""
        resync_at = time.monotonic() + RESYNC_AFTER if self._shared else float("inf")
        while True:
            # On a port, an agent left mid-frame by an earlier client is reset by a run of zero bytes
            # (an invalid frame), after which it scans for the next HELLO. That costs the guest time
            # to read, so it is sent once, and only when plain HELLOs went unanswered for a while (a
            # booting guest answers late, and must not be made to wade through zeros first).
            if time.monotonic() >= resync_at:
                resync_at = float("inf")
                await self.sendraw(RESYNC + hello)
            else:
                await self.sendraw(hello)
            try:
                return await self._control_reply(FrameType.HELLO, HELLO_RETRY)
            except AgentConnectionError:
                if self.broken:
                    raise self.failure() from None

    async def ping(self, *, timeout: float = 10) -> float:
        """Round trip time of a PING, in seconds."""
        nonce = time.monotonic_ns().to_bytes(8, "big")
        start = time.monotonic()
        await self.send(0, FrameType.PING, nonce)
        frame = await self._control_reply(FrameType.PONG, timeout)
        if frame.payload != nonce:
            raise self.violation("PONG does not echo the PING payload")
        return time.monotonic() - start

    async def shutdown(self) -> None:
        await self.send(0, FrameType.SHUTDOWN)

    async def _control_reply(self, expected: FrameType, timeout: float) -> Frame:
        try:
            frame = await asyncio.wait_for(self._control.get(), timeout)
        except TimeoutError:
            raise AgentConnectionError(f"the agent did not answer within {timeout:g}s") from None
        if frame is None:
            raise self.failure()
        if frame.type is not expected:
            raise self.violation(f"expected {expected.name}, got {frame.type.name}")
        return frame

    # -- exec -------------------------------------------------------------------------------

    async def exec(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float | None = None,
        pty: tuple[int, int] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> Process:
        """Start `argv` in the guest. `pty` is (rows, cols) to run it on a terminal.

        The guest kills the command after `timeout` seconds; should it not, the host gives up on it
        TIMEOUT_GRACE seconds later. An agent that does not start it within `start_timeout` seconds
        gets it killed, and AgentConnectionError is raised. Arguments over Linux's limits raise
        ArgumentsTooLongError; those that do not fit one frame go in ARGS frames after the EXEC.
        """
        command = new_command_id()
        records = self._exec_records(argv, env, cwd, uid, gid, timeout, pty, command, detach=False)
        channel, frame = await self._start(records, start_timeout, detach=False)
        if frame.type is FrameType.ERROR:
            self.release(channel)
            raise exec_error(decode_record(frame.payload))
        if frame.type is not FrameType.STARTED:
            raise self.violation(f"expected STARTED, got {frame.type.name}")
        pid = decode_record(frame.payload).int(Tag.PID)
        shown = [a if isinstance(a, str) else a.decode(errors="replace") for a in argv]
        return Process(channel, pid if pid is not None else -1, shown, timeout=timeout, command=command)

    async def _start(
        self, records: list[bytes], start_timeout: float, *, detach: bool
    ) -> tuple[_Channel, Frame]:
        """Send an EXEC (and its ARGS) on a new channel; the channel and the agent's first answer."""
        channel = self._open_channel(FrameType.EXEC, detach=detach)
        types = [FrameType.EXEC] + [FrameType.ARGS] * (len(records) - 1)
        try:
            # One write: the agent gets the whole request, or the connection breaks.
            await self.sendraw(b"".join(map(encode, [channel.id] * len(records), types, records)))
            async with asyncio.timeout(start_timeout):
                return channel, await channel.next()
        except TimeoutError:
            self.abandon(channel)
            raise AgentConnectionError(
                f"the agent did not start the command within {start_timeout:g}s"
            ) from None
        except BaseException:
            self.abandon(channel)  # cancelled: a SIGNAL ends the request, or its process, in the guest
            raise

    def _exec_records(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str] | None,
        cwd: str | None,
        uid: int | None,
        gid: int | None,
        timeout: float | None,
        pty: tuple[int, int] | None,
        command: str,
        *,
        detach: bool,
    ) -> list[bytes]:
        """The EXEC record and the ARGS records after it, once the request is checked. `command` is
        the command's id (its environment may carry it: `command_env`)."""
        if not argv:
            raise AgentkernelError("no command given")
        tagged = self.command_env(command) if self.command_env else {}
        args, env_strings = check_arguments(argv, {**self.default_env, **tagged, **(env or {})})
        fields = exec_fields(cwd=cwd, uid=uid, gid=gid, timeout=timeout, pty=pty, detach=detach)
        records = exec_records(fields, args, env_strings)
        if len(records) > 1 and self.agent_version < ARGS_VERSION:
            raise ArgumentsTooLongError(
                f"this sandbox's agent (protocol {self.agent_version}) takes a command's arguments and "
                f"environment in one frame of {MAX_PAYLOAD} bytes: recreate the sandbox from a current "
                f"image for up to {ARG_MAX} (ARG_MAX)"
            )
        return records

    async def run(
        self,
        argv: Sequence[str | bytes],
        *,
        stdin: bytes = b"",
        limit: int = 64 << 20,
        **kwargs: object,
    ) -> Completed:
        """Run a command to completion and collect its output (at most `limit` bytes of each stream)."""
        proc = await self.exec(argv, **kwargs)  # type: ignore[arg-type]
        feeder = asyncio.create_task(_feed(proc, stdin))
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        try:
            async for chunk in proc.output():
                buf = out[chunk.stream]
                if len(buf) + len(chunk.data) > limit:
                    raise AgentkernelError(f"command {chunk.stream} exceeds {limit} bytes")
                buf += chunk.data
        finally:
            proc.abandon()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, AgentkernelError):
                await feeder
        assert proc.status is not None
        return Completed(proc.status, bytes(out["stdout"]), bytes(out["stderr"]))

    # -- background commands ----------------------------------------------------------------

    def _need_background(self) -> None:
        if self.agent_version < BACKGROUND_VERSION:
            raise SandboxStateError(
                f"this sandbox's agent (protocol {self.agent_version}) has no background commands, "
                "rename or watch: recreate the sandbox from a current image"
            )

    async def exec_background(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> BackgroundCommand:
        """Start `argv` detached: it runs on after this connection closes, until it exits, the guest
        kills it after `timeout` seconds, or the sandbox ends. Its stdout and stderr go, together and
        in order, to a ring of the last 1 MiB in the guest that `attach_background` reads. A start that
        fails raises as `exec` does; the guest keeps 64 commands, and refuses a new one (ExecError,
        EAGAIN) when all of them still run."""
        self._need_background()
        command = new_command_id()
        records = self._exec_records(argv, env, cwd, uid, gid, timeout, None, command, detach=True)
        channel, frame = await self._start(records, start_timeout, detach=True)
        self.release(channel)
        record = decode_record(frame.payload)
        if frame.type is FrameType.ERROR:
            raise exec_error(record)
        cmd_id, pid = record.int(Tag.CMD), record.int(Tag.PID)
        if cmd_id is None or cmd_id <= 0 or pid is None:
            raise self.violation("a background command's OK lacks its id or pid")
        shown = [a if isinstance(a, str) else a.decode(errors="replace") for a in argv]
        self.notify("exec_background", argv=shown, id=cmd_id, pid=pid, command=command)
        return BackgroundCommand(cmd_id, pid)

    async def list_background(self) -> list[BackgroundInfo]:
        """The background commands the guest keeps, oldest first (ended ones too, until 64 newer
        ones push them out)."""
        self._need_background()
        channel = await self._file_op(FrameType.JOBS, [])
        found: list[BackgroundInfo] = []
        while True:
            frame = await channel.next()
            if frame.type is not FrameType.ENTRY:
                await self._finish(channel, frame, BackgroundCommandError)
                return found
            if len(found) >= MAX_JOBS:
                raise self.violation(f"more than {MAX_JOBS} background commands listed")
            record = decode_record(frame.payload)
            running = record.int(Tag.STATE) != 3
            found.append(
                BackgroundInfo(
                    id=record.int(Tag.CMD, 0) or 0,
                    pid=record.int(Tag.PID, -1) or -1,
                    argv=[a.decode(errors="replace") for a in record.all(Tag.ARGV)],
                    running=running,
                    started_ns=record.int(Tag.STARTED_NS, 0) or 0,
                    output_size=max(0, record.int(Tag.OFFSET, 0) or 0),
                    output_lost=max(0, record.int(Tag.LOST, 0) or 0),
                    status=None if running else _exit_status(record),
                )
            )

    async def attach_background(self, cmd_id: int, *, offset: int = 0, follow: bool = True) -> Attachment:
        """Read a background command's output from byte `offset` of all it wrote (0: from the start of
        what the guest keeps): `Attachment.output()` yields it, then live output until it ends. Any
        number of readers may follow one command; one that reads slower than the command writes gets
        a `lost` count where the guest's ring overtook it. Raises BackgroundCommandError (404) for an
        unknown id."""
        self._need_background()
        attachment = Attachment(self, cmd_id, max(0, offset), follow)
        await attachment._open()
        return attachment

    async def write_background(
        self, cmd_id: int, data: bytes, *, eof: bool = False, timeout: float = 30.0
    ) -> None:
        """Send `data` to a background command's stdin; with `eof`, close its stdin after it. The guest
        holds 256 KiB of unread stdin per command: past that, this waits (up to `timeout` seconds) for
        the command to read, then raises BackgroundCommandError (stdin_full)."""
        self._need_background()
        view = memoryview(data)
        give_up = time.monotonic() + timeout
        while True:
            piece = bytes(view[:INPUT_CHUNK])
            last = len(view) <= INPUT_CHUNK
            fields: list[tuple[Tag, int | bytes | str]] = [(Tag.CMD, cmd_id), (Tag.DATA, piece)]
            if eof and last:
                fields.append((Tag.EOF, 1))
            try:
                await self._simple(FrameType.INPUT, fields, BackgroundCommandError)
            except BackgroundCommandError as exc:
                if exc.errno != EAGAIN or time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(INPUT_RETRY)
                continue
            if last:
                return
            view = view[INPUT_CHUNK:]

    async def close_background_stdin(self, cmd_id: int) -> None:
        """Close a background command's stdin (after what was written to it)."""
        await self.write_background(cmd_id, b"", eof=True)

    async def signal_background(self, cmd_id: int, signo: int) -> None:
        """Send a signal to a background command's process group (SIGKILL: to every process it
        started). BackgroundCommandError: 404 for an unknown id, 409 once it has exited."""
        self._need_background()
        await self._simple(FrameType.KILL, [(Tag.CMD, cmd_id), (Tag.SIGNAL, signo)], BackgroundCommandError)

    async def wait_background(self, cmd_id: int) -> ExitStatus:
        """Wait for a background command to end; its exit status (at once if it already has)."""
        self._need_background()
        channel = await self._file_op(FrameType.WAIT, [(Tag.CMD, cmd_id)])
        try:
            frame = await channel.next()
        except BaseException:
            self.abandon(channel)
            raise
        return _exit_status(await self._finish(channel, frame, BackgroundCommandError, ok=FrameType.EXIT))

    # -- ports ------------------------------------------------------------------------------

    async def open_tcp(self, port: int, *, timeout: float = START_TIMEOUT) -> TcpStream:
        """A TCP connection to 127.0.0.1:`port` in the guest. GuestPortError when it fails there
        (`errno` ECONNREFUSED: nothing listens on the port); SandboxStateError for an agent older
        than protocol 4."""
        if self.agent_version < PORTS_VERSION:
            raise SandboxStateError(
                f"this sandbox's agent (protocol {self.agent_version}) cannot reach ports in the "
                "guest: recreate the sandbox from a current image"
            )
        if not 1 <= port <= 65535:
            raise AgentkernelError(f"a port is 1 to 65535 (got {port})")
        channel = await self._file_op(FrameType.CONNECT, [(Tag.PORT, port)])
        try:
            async with asyncio.timeout(timeout):
                frame = await channel.next()
        except TimeoutError:
            self.abandon(channel)
            raise GuestPortError(
                f"the agent did not connect to port {port} within {timeout:g}s", None
            ) from None
        except BaseException:
            self.abandon(channel)
            raise
        if frame.type is not FrameType.STARTED:
            await self._finish(channel, frame, GuestPortError)
            raise self.violation("CONNECT answered with OK before STARTED")
        return TcpStream(self, channel, port)

    # -- files ------------------------------------------------------------------------------

    async def _file_op(self, ftype: FrameType, fields: list[tuple[Tag, int | bytes | str]]) -> _Channel:
        path = next((value for tag, value in fields if tag is Tag.PATH), b"")
        if isinstance(path, bytes) and len(path) >= PATH_MAX:  # would fail in the guest, or not fit a frame
            raise FileOpError(f"the path is longer than {PATH_MAX - 1} bytes", ENAMETOOLONG)
        channel = self._open_channel(ftype)
        await self.send(channel.id, ftype, encode_record(fields))
        return channel

    async def _finish(
        self,
        channel: _Channel,
        frame: Frame,
        error: type[FileOpError | BackgroundCommandError | GuestPortError] = FileOpError,
        *,
        ok: FrameType = FrameType.OK,
    ) -> Record:
        """The record of the frame that ends an operation (OK, or also `ok`), or its ERROR raised as
        `error`."""
        self.release(channel)
        record = decode_record(frame.payload)
        if frame.type is FrameType.ERROR:
            raise error(record.str(Tag.MESSAGE, "the operation failed")[:500], record.int(Tag.ERRNO))
        if frame.type not in (FrameType.OK, ok):
            raise self.violation(f"unexpected {frame.type.name} frame ending {channel.op.name}")
        return record

    async def read_file(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes as they arrive. Raises FileOpError if the guest cannot read it."""
        channel = await self._file_op(FrameType.GET, [(Tag.PATH, raw(path))])
        ended = False
        size = 0
        try:
            while True:
                frame = await channel.next()
                if frame.type is FrameType.INFO:
                    continue
                if frame.type is FrameType.DATA and not ended:
                    if not frame.payload:
                        ended = True
                        continue
                    size += len(frame.payload)
                    yield frame.payload
                elif frame.type is not FrameType.WINDOW:
                    await self._finish(channel, frame)
                    if not ended:
                        raise self.violation("GET ended without the end of its data")
                    self.notify("file_read", path=path, size=size)
                    return
        finally:
            self.abandon(channel)  # the reader stopped early: end the transfer in the guest

    async def write_file(self, path: str, chunks: AsyncIterator[bytes], *, mode: int = 0o644) -> int:
        """Write a guest file from `chunks`; the guest renames it into place only when all arrived."""
        channel = await self._file_op(FrameType.PUT, [(Tag.PATH, raw(path)), (Tag.MODE, mode)])
        try:
            async for chunk in chunks:
                if not channel.frames.empty():  # an early ERROR (say, no such directory): stop sending
                    break
                await channel.send_data(FrameType.DATA, chunk)
            else:
                await self.send(channel.id, FrameType.DATA, b"")
        except BaseException:
            self.abandon(channel)  # `chunks` failed: the guest drops the partial file
            raise
        while True:
            frame = await channel.next()
            if frame.type is not FrameType.WINDOW:
                written = (await self._finish(channel, frame)).int(Tag.SIZE, 0) or 0
                self.notify("file_write", path=path, size=written)
                return written

    async def _simple(
        self,
        ftype: FrameType,
        fields: list[tuple[Tag, int | bytes | str]],
        error: type[FileOpError | BackgroundCommandError] = FileOpError,
    ) -> Record:
        channel = await self._file_op(ftype, fields)
        return await self._finish(channel, await channel.next(), error)

    async def stat(self, path: str) -> FileInfo:
        record = await self._simple(FrameType.STAT, [(Tag.PATH, raw(path))])
        return _file_info(record, name=path.rstrip("/").rsplit("/", 1)[-1])

    async def list_dir(self, path: str, *, limit: int = 100_000) -> list[FileInfo]:
        channel = await self._file_op(FrameType.LIST, [(Tag.PATH, raw(path))])
        entries: list[FileInfo] = []
        while True:
            frame = await channel.next()
            if frame.type is FrameType.ENTRY:
                if len(entries) >= limit:
                    raise self.violation(f"directory listing longer than {limit} entries")
                entries.append(_file_info(decode_record(frame.payload)))
            else:
                await self._finish(channel, frame)
                return entries

    async def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = False) -> None:
        await self._simple(
            FrameType.MKDIR, [(Tag.PATH, raw(path)), (Tag.MODE, mode), (Tag.PARENTS, int(parents))]
        )

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._simple(FrameType.REMOVE, [(Tag.PATH, raw(path)), (Tag.RECURSIVE, int(recursive))])

    async def rename(self, path: str, to: str) -> None:
        """rename(2) in the guest: `to` is replaced if it is a file (or an empty directory, for a
        directory); both paths on one filesystem (EXDEV otherwise)."""
        self._need_background()
        if len(raw(to)) >= PATH_MAX:
            raise FileOpError(f"the path is longer than {PATH_MAX - 1} bytes", ENAMETOOLONG)
        await self._simple(FrameType.RENAME, [(Tag.PATH, raw(path)), (Tag.TO, raw(to))])

    async def watch(self, path: str, *, recursive: bool = False) -> Watch:
        """Watch directory `path` in the guest (inotify): `Watch.events()` yields each change as it
        happens. With `recursive`, the directories under it too (also those made later), down to 32
        levels and 1024 directories. FileOpError if it is not a directory or cannot be watched."""
        self._need_background()
        channel = await self._file_op(
            FrameType.WATCH, [(Tag.PATH, raw(path)), (Tag.RECURSIVE, int(recursive))]
        )
        try:
            frame = await channel.next()
        except BaseException:
            self.abandon(channel)
            raise
        if frame.type is not FrameType.STARTED:
            await self._finish(channel, frame)
            raise self.violation("WATCH answered with OK before STARTED")
        return Watch(self, channel)

    async def exists(self, path: str) -> bool:
        """Whether `path` exists in the guest (a STAT; a dangling symlink does not)."""
        try:
            await self.stat(path)
        except FileOpError as exc:
            if exc.errno == ENOENT:
                return False
            raise
        return True

    async def walk(self, path: str, *, depth: int = 1, limit: int = 100_000) -> list[FileInfo]:
        """The entries under directory `path` down to `depth` levels (1: its own entries), each
        `name` the path relative to `path`, parents before their children. The host walks, one LIST
        per directory, never into symlinks; at most `limit` entries in all (AgentkernelError past
        that). A directory that vanishes or cannot be read on the way is skipped."""
        if depth < 1:
            raise AgentkernelError(f"the depth must be at least 1 (got {depth})")
        found: list[FileInfo] = []
        level = [""]
        for _ in range(depth):
            below: list[str] = []
            for rel in level:
                try:
                    entries = await self.list_dir(f"{path.rstrip('/')}/{rel}" if rel else path)
                except FileOpError:
                    if not rel:
                        raise
                    continue
                for entry in sorted(entries, key=lambda e: e.name):
                    name = f"{rel}/{entry.name}" if rel else entry.name
                    if len(found) >= limit:
                        raise AgentkernelError(f"{path} holds more than {limit} entries")
                    found.append(FileInfo(name, entry.kind, entry.size, entry.mode, entry.mtime_ns))
                    if entry.kind == "dir":
                        below.append(name)
            level = below
        return found

    # -- plumbing ----------------------------------------------------------------------------

    def _open_channel(self, op: FrameType, *, detach: bool = False) -> _Channel:
        if self.broken:
            raise self.failure()
        if len(self._channels) >= MAX_CHANNELS:
            raise AgentkernelError(f"too many operations at once on one connection (limit {MAX_CHANNELS})")
        while self._next_id in self._channels:
            self._next_id = self._next_id % 65535 + 1
        channel = _Channel(self, self._next_id, op, detach=detach)
        self._channels[channel.id] = channel
        self._next_id = self._next_id % 65535 + 1
        return channel

    def notify(self, event: str, **fields: Any) -> None:
        if self.observer is not None:
            self.observer(event, fields)

    def release(self, channel: _Channel) -> None:
        channel.closed = True
        self._channels.pop(channel.id, None)

    def abandon(self, channel: _Channel) -> None:
        """End an open channel from the host side without waiting; its later frames are dropped.

        An exec's process group gets SIGKILL, and the agent's EXIT then ends the channel. A file
        operation is ended by sending another operation on its id, which the agent answers by ending
        the channel (a partial PUT is deleted) with ERROR EBUSY; if the operation had already ended on
        its own, the extra one gets its own answer, which is awaited too. Frames are written without
        awaiting, so this works from cleanup code that runs while a task is being cancelled.
        """
        if channel.closed or channel.abandoned or self.broken:
            return
        channel.abandoned = True
        unread, channel.consumed = channel.consumed, 0
        while not channel.frames.empty():
            frame = channel.frames.get_nowait()
            if frame is not None and frame.type in ENDING_TYPES:
                self.release(channel)
                return
            if frame is not None and frame.type in DATA_TYPES:
                unread += len(frame.payload)
        if unread:
            channel.recv_window += unread
            self._write_now(channel.id, FrameType.WINDOW, encode_record([(Tag.BYTES, unread)]))
        if channel.is_exec:
            self._write_now(channel.id, FrameType.SIGNAL, encode_record([(Tag.SIGNAL, signal.SIGKILL)]))
        else:
            self._write_now(channel.id, FrameType.STAT, encode_record([(Tag.PATH, b"/")]))

    def _abandoned_frame(self, channel: _Channel, frame: Frame) -> None:
        if frame.type in DATA_TYPES and frame.payload:  # keep the sender going until it ends
            channel.recv_window += len(frame.payload)
            self._write_now(channel.id, FrameType.WINDOW, encode_record([(Tag.BYTES, len(frame.payload))]))
        elif frame.type is FrameType.STARTED:  # given up on before it started: the SIGKILL came too early
            self._write_now(channel.id, FrameType.SIGNAL, encode_record([(Tag.SIGNAL, signal.SIGKILL)]))
        elif frame.type in ENDING_TYPES:
            aborted = frame.type is FrameType.ERROR and decode_record(frame.payload).int(Tag.ERRNO) == EBUSY
            if channel.is_exec or aborted or channel.ended_once:
                self.release(channel)
            channel.ended_once = True

    def _write_now(self, channel: int, ftype: FrameType, payload: bytes) -> None:
        """Queue a frame without awaiting: one write() call, so it never splits another frame."""
        try:
            self._writer.write(encode(channel, ftype, payload))
        except (OSError, RuntimeError) as exc:
            self._fail(AgentConnectionError(f"lost the connection to the sandbox agent: {exc}"))

    async def send(self, channel: int, ftype: FrameType, payload: bytes = b"") -> None:
        await self.sendraw(encode(channel, ftype, payload))

    async def sendraw(self, data: bytes) -> None:
        if self.broken:
            raise await self.lost()
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._fail(AgentConnectionError(f"lost the connection to the sandbox agent: {exc}"))
                raise await self.lost() from None

    @property
    def broken(self) -> bool:
        return self._error is not None

    def failure(self) -> AgentConnectionError:
        return self._error or AgentConnectionError("the connection to the sandbox agent is closed")

    async def lost(self) -> AgentConnectionError:
        """`failure()`, once `explain` has worded it."""
        if self._explaining is not None:
            await asyncio.wait([self._explaining])
        return self.failure()

    def violation(self, what: str) -> AgentConnectionError:
        self._fail(ProtocolError(what))
        return self.failure()

    def _fail(self, error: AgentConnectionError, *, flush: bool = False) -> None:
        """Break the connection: every waiter gets `error` (as `explain` words it, for a connection
        lost rather than closed by the host). What is still to be sent is dropped, unless `flush` (the
        host is closing it): then the socket closes once that is written."""
        first = self._error is None
        if first:
            self._error = error
        if flush:
            self._writer.close()
        else:
            self._writer.transport.abort()
        if first and not flush and self.explain is not None:
            self._explaining = asyncio.create_task(self._explain_then_wake(self.explain, error))
        else:
            self._wake_waiters()

    async def _explain_then_wake(self, explain: Explain, error: AgentConnectionError) -> None:
        try:
            with contextlib.suppress(AgentkernelError):  # then the error stays as it was
                self._error = await explain(error)
        finally:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        for channel in self._channels.values():
            channel.frames.put(None)
            channel.send_ready.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._control.put_nowait(None)

    async def _beat(self) -> None:
        """The heartbeat: whatever the agent sends counts as an answer."""
        while not self.broken:
            heard = self._last_heard
            await asyncio.sleep(max(0.0, heard + HEARTBEAT_INTERVAL - time.monotonic()))
            if self._last_heard != heard or self.broken:
                continue
            self._write_now(0, FrameType.PING, HEARTBEAT_NONCE)
            await asyncio.sleep(HEARTBEAT_TIMEOUT)
            if self._last_heard == heard:
                silent = time.monotonic() - heard
                self._fail(
                    AgentConnectionError(
                        f"the sandbox agent has not answered for {silent:.0f}s: the connection was "
                        "reset (a snapshot resets a Firecracker sandbox's connections) or the guest hangs"
                    )
                )

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                self._last_heard = time.monotonic()
                if not data:
                    self._fail(AgentConnectionError("the sandbox agent closed the connection"))
                    return
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except ProtocolError as exc:
            self.violation(exc.what)
        except OSError as exc:
            self._fail(AgentConnectionError(f"lost the connection to the sandbox agent: {exc}"))
        except asyncio.CancelledError:
            self._fail(AgentConnectionError("the connection to the sandbox agent is closed"), flush=True)

    def _dispatch(self, frame: Frame) -> None:
        if frame.channel == 0:
            if frame.type not in (FrameType.HELLO, FrameType.PONG):
                raise ProtocolError(f"unexpected {frame.type.name} frame on the control channel")
            if frame.type is FrameType.PONG and len(frame.payload) > MAX_PING:
                raise ProtocolError("PONG payload too long")
            if frame.type is FrameType.PONG and frame.payload == HEARTBEAT_NONCE:
                return  # the heartbeat's: reading it was the point
            if frame.type is FrameType.HELLO and self._greeted:
                return  # the answer to a repeated HELLO
            try:
                self._control.put_nowait(frame)
            except asyncio.QueueFull:
                raise ProtocolError("unsolicited control frames") from None
            return
        channel = self._channels.get(frame.channel)
        if channel is None:
            raise ProtocolError(f"frame for channel {frame.channel}, which is not open")
        if frame.type is FrameType.WINDOW:
            grant = decode_record(frame.payload).int(Tag.BYTES, 0) or 0
            if not 0 < grant <= (1 << 31):
                raise ProtocolError(f"bad WINDOW grant {grant}")
            channel.send_window += grant
            channel.send_ready.set()
            return
        if frame.type in DATA_TYPES:
            channel.recv_window -= len(frame.payload)
            if channel.recv_window < 0:
                raise ProtocolError(f"channel {frame.channel} sent more data than its window allows")
        _check_reply(channel, frame)
        if channel.abandoned:
            self._abandoned_frame(channel, frame)
        else:
            channel.frames.put(frame)

    async def close(self) -> None:
        """Close once what was sent is written, or after CLOSE_TIMEOUT seconds without: a guest that
        does not read must not keep the socket open."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self._task.cancel()
        await asyncio.wait([self._task])  # its cancellation stays its own; the caller's propagates
        if self._explaining is not None:
            self._explaining.cancel()
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except (OSError, RuntimeError):
            pass

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _check_reply(channel: _Channel, frame: Frame) -> None:
    """Refuse what the channel's operation does not allow (REPLIES). What a channel holds unread is
    then bounded by its window and REPLIES, however slowly its reader takes it."""
    if frame.type not in channel.replies:
        raise ProtocolError(f"{frame.type.name} frame on channel {channel.id}, which runs {channel.op.name}")
    if channel.abandoned:
        return  # an abandoned file operation may end twice (see Connection.abandon)
    if not channel.seen.isdisjoint(ENDING_TYPES):
        raise ProtocolError(f"{frame.type.name} frame on channel {channel.id} after its end")
    if frame.type is FrameType.ENTRY or (frame.type in DATA_TYPES and frame.payload):
        return
    if frame.type in (FrameType.STDOUT, FrameType.STDERR):
        raise ProtocolError(f"empty {frame.type.name} frame on channel {channel.id}")
    if frame.type in channel.seen:
        raise ProtocolError(f"second {frame.type.name} frame on channel {channel.id}")
    channel.seen.add(frame.type)


async def _feed(proc: Process, data: bytes) -> None:
    await proc.write(data)
    await proc.close_stdin()


def _exit_status(record: Record) -> ExitStatus:
    return ExitStatus(*exit_fields(record))
