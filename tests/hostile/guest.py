"""A stand-in guest agent, well-behaved or hostile, serving the agent side of the protocol on a Unix socket.

It listens the way QEMU's chardev behind a virtio-serial port does (one stream per host client, the
host speaking first) and, like the real agent on a port, skips whatever precedes the host's HELLO. Run
it in a process of its own, so that what it allocates is not counted as the host's:

    python -m tests.hostile.guest SOCKET BEHAVIOUR

The well-behaved guest runs three pretend commands: `echo ARG...`, `emit N` (N bytes of output within
the windows it is granted) and `cat` (stdin back to stdout). Every other behaviour breaks the protocol
in one way, named after it (see BEHAVIOURS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from agentkernel.protocol.frames import (
    FIELD,
    HEADER,
    INITIAL_WINDOW,
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    Tag,
    decode_record,
    encode,
    encode_record,
)

FLOOD_CAP = 1 << 30
"""Bytes any flood stops at, so that a guest whose host never hangs up still ends."""


class Agent:
    """One connection's agent side; subclasses misbehave by overriding the handlers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(hunt_hello=True)
        self.windows: dict[int, int] = {}
        self.granted: dict[int, asyncio.Event] = {}
        self.stdin: dict[int, asyncio.Queue[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        try:
            while data := await self.reader.read(65536):
                try:
                    for frame in self.decoder.feed(data):
                        await self.handle(frame)
                except ProtocolError:  # as the agent does on a port: back to scanning for a HELLO
                    self.decoder = FrameDecoder(hunt_hello=True)
        except ConnectionError:
            pass
        finally:
            for task in self.tasks:
                task.cancel()
            self.writer.close()

    async def send(self, channel: int, ftype: FrameType, payload: bytes = b"") -> None:
        self.writer.write(encode(channel, ftype, payload))
        await self.writer.drain()

    async def handle(self, frame: Frame) -> None:
        if frame.type is FrameType.HELLO:
            await self.on_hello()
        elif frame.type is FrameType.PING:
            await self.send(0, FrameType.PONG, frame.payload)
        elif frame.type is FrameType.EXEC:
            argv = [a.decode(errors="surrogateescape") for a in decode_record(frame.payload).all(Tag.ARGV)]
            self.windows[frame.channel] = INITIAL_WINDOW
            self.granted[frame.channel] = asyncio.Event()
            self.stdin[frame.channel] = asyncio.Queue()
            self.spawn(self.on_exec(frame.channel, argv))
        elif frame.type is FrameType.WINDOW:
            if frame.channel in self.windows:
                self.windows[frame.channel] += decode_record(frame.payload).int(Tag.BYTES, 0) or 0
                self.granted[frame.channel].set()
        elif frame.type is FrameType.STDIN:
            if frame.channel in self.stdin:
                self.stdin[frame.channel].put_nowait(frame.payload)
        elif frame.type is FrameType.SIGNAL and frame.channel in self.windows:
            signo = decode_record(frame.payload).int(Tag.SIGNAL, 9) or 9
            await self.end(frame.channel, FrameType.EXIT, encode_record([(Tag.SIGNAL, signo)]))

    def spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            with contextlib.suppress(ConnectionError):
                await work

        task = asyncio.create_task(guarded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def on_hello(self) -> None:
        record = [(Tag.VERSION, VERSION), (Tag.MAGIC, MAGIC), (Tag.MESSAGE, type(self).__name__)]
        await self.send(0, FrameType.HELLO, encode_record(record))

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        if argv[0] == "echo":
            await self.started(channel)
            await self.output(channel, (" ".join(argv[1:]) + "\n").encode(errors="surrogateescape"))
        elif argv[0] == "emit":
            await self.started(channel)
            await self.output(channel, b"y" * int(argv[1]))
        elif argv[0] == "cat":
            await self.started(channel)
            while data := await self.stdin[channel].get():
                await self.output(channel, data)
        else:
            error = encode_record([(Tag.MESSAGE, f"{argv[0]}: no such file"), (Tag.ERRNO, 2)])
            await self.end(channel, FrameType.ERROR, error)
            return
        await self.end(channel, FrameType.EXIT, encode_record([(Tag.EXIT_CODE, 0)]))

    async def started(self, channel: int) -> None:
        await self.send(channel, FrameType.STARTED, encode_record([(Tag.PID, 1000 + channel)]))

    async def output(
        self, channel: int, data: bytes, chunk: int = MAX_PAYLOAD, *, ftype: FrameType = FrameType.STDOUT
    ) -> None:
        """`data` as `ftype` frames (STDOUT, STDERR, DATA) of at most `chunk` bytes, never beyond the
        window."""
        while data and channel in self.windows:
            if self.windows[channel] <= 0:
                self.granted[channel].clear()
                await self.granted[channel].wait()
                continue
            n = min(len(data), chunk, self.windows[channel])
            self.windows[channel] -= n
            await self.send(channel, ftype, data[:n])
            data = data[n:]

    async def end(self, channel: int, ftype: FrameType, record: bytes) -> None:
        if self.windows.pop(channel, None) is not None:
            await self.send(channel, ftype, record)


class Silent(Agent):
    """Reads everything and never answers: not HELLO, not anything."""

    async def serve(self) -> None:
        while await self.reader.read(65536):
            pass


class DoubleHello(Agent):
    """Answers every HELLO twice, the second answer straight behind the first."""

    async def on_hello(self) -> None:
        await super().on_hello()
        await super().on_hello()


class Deaf(Agent):
    """Neither reads nor answers: what the host writes piles up in the socket."""

    async def serve(self) -> None:
        await asyncio.sleep(3600)


class SilentExec(Agent):
    """Answers HELLO and PING, never an EXEC (no STARTED, no ERROR)."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        pass


class NoExit(Agent):
    """Starts every command and never ends it, whatever its timeout."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)


async def flood(send: Callable[[], Awaitable[int]]) -> None:
    sent = 0
    while sent < FLOOD_CAP:
        sent += await send()


class Garbage(Agent):
    """Random bytes from the start, never a HELLO."""

    async def serve(self) -> None:
        self.spawn(flood(self.garbage))
        await super().serve()

    async def handle(self, frame: Frame) -> None:
        pass

    async def garbage(self) -> int:
        self.writer.write(os.urandom(65536))
        await self.writer.drain()
        return 65536


class GarbageAfterHello(Garbage):
    """A proper HELLO answer, then random bytes."""

    async def serve(self) -> None:
        await Agent.serve(self)

    async def on_hello(self) -> None:
        await super().on_hello()
        if not self.tasks:  # the first HELLO only
            self.spawn(flood(self.garbage))

    async def handle(self, frame: Frame) -> None:
        if frame.type is FrameType.HELLO:
            await self.on_hello()


class Oversized(Agent):
    """Answers EXEC with STARTED and then a frame header claiming 64 times the payload limit."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)
        self.writer.write(HEADER.pack(64 * MAX_PAYLOAD, channel, FrameType.STDOUT, 0))

        async def body() -> int:
            self.writer.write(b"x" * 65536)
            await self.writer.drain()
            return 65536

        await flood(body)


class UnknownChannel(Agent):
    """Answers EXEC with STARTED, and sends the output on a channel the host never opened."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)
        await self.send(channel + 1000, FrameType.STDOUT, b"not yours")


class Flood(Agent):
    """Answers EXEC with STARTED, then full STDOUT frames without end, ignoring the window."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)

        async def frame() -> int:
            await self.send(channel, FrameType.STDOUT, b"f" * MAX_PAYLOAD)
            return MAX_PAYLOAD

        await flood(frame)


class TinyFrames(Agent):
    """`tiny`: one window of output at one byte per frame (legal: the most frames a window allows), then
    EXIT. Later frames wait for it, so the answer to a later EXEC tells the host that all of it was sent.
    """

    async def handle(self, frame: Frame) -> None:
        if frame.type is not FrameType.EXEC or decode_record(frame.payload).all(Tag.ARGV)[:1] != [b"tiny"]:
            await super().handle(frame)
            return
        await self.started(frame.channel)
        self.writer.write(encode(frame.channel, FrameType.STDOUT, b"t") * INITIAL_WINDOW)
        await self.send(frame.channel, FrameType.EXIT, encode_record([(Tag.EXIT_CODE, 0)]))


class EmptyFrames(Agent):
    """Empty STDOUT frames without end: they use no window, so the window does not bound them."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)
        empty = encode(channel, FrameType.STDOUT) * 8192

        async def batch() -> int:
            self.writer.write(empty)
            await self.writer.drain()
            return len(empty)

        await flood(batch)


class ControlFlood(Agent):
    """STARTED, then INFO records without end: frames that no window bounds."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)
        info = encode(channel, FrameType.INFO, encode_record([(Tag.SIZE, 1)])) * 2048

        async def batch() -> int:
            self.writer.write(info)
            await self.writer.drain()
            return len(info)

        await flood(batch)


class StartedTwice(Agent):
    """Answers EXEC with two STARTED frames."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)
        await self.started(channel)


class AfterExit(Agent):
    """Ends every command, then sends more output on its channel."""

    async def on_exec(self, channel: int, argv: list[str]) -> None:
        await self.started(channel)
        await self.send(channel, FrameType.EXIT, encode_record([(Tag.EXIT_CODE, 0)]))
        await self.send(channel, FrameType.STDOUT, b"late")


class JobsFlood(Agent):
    """Answers JOBS (the list of background commands) with ENTRY records without end."""

    async def handle(self, frame: Frame) -> None:
        if frame.type is not FrameType.JOBS:
            await super().handle(frame)
            return
        entry = encode_record([(Tag.CMD, 1), (Tag.PID, 2), (Tag.STATE, 2), (Tag.ARGV, b"x" * 400)])
        batch = encode(frame.channel, FrameType.ENTRY, entry) * 512

        async def more() -> int:
            self.writer.write(batch)
            await self.writer.drain()
            return len(batch)

        self.spawn(flood(more))


class AttachStall(Agent):
    """Answers every ATTACH with STARTED and at once an OK saying it fell behind the ring, without a
    byte of output: a host that attaches again each time would never end."""

    async def handle(self, frame: Frame) -> None:
        if frame.type is not FrameType.ATTACH:
            await super().handle(frame)
            return
        await self.send(frame.channel, FrameType.STARTED, encode_record([(Tag.PID, 2), (Tag.OFFSET, 0)]))
        await self.send(frame.channel, FrameType.OK, encode_record([(Tag.OFFSET, 0), (Tag.LOST, 5)]))


class AttachFlood(Agent):
    """Answers ATTACH with STARTED, then full STDOUT frames without end, ignoring the window."""

    async def handle(self, frame: Frame) -> None:
        if frame.type is not FrameType.ATTACH:
            await super().handle(frame)
            return
        channel = frame.channel
        await self.send(channel, FrameType.STARTED, encode_record([(Tag.PID, 2), (Tag.OFFSET, 0)]))

        async def more() -> int:
            await self.send(channel, FrameType.STDOUT, b"a" * MAX_PAYLOAD)
            return MAX_PAYLOAD

        self.spawn(flood(more))


class WatchHugeField(Agent):
    """Answers WATCH with STARTED, then event bytes whose first field claims a size of 1 GiB, and more
    such bytes for as long as the window lasts: a host that waited for the field to complete would
    hold all of it."""

    async def handle(self, frame: Frame) -> None:
        if frame.type is not FrameType.WATCH:
            await super().handle(frame)
            return
        await self.send(frame.channel, FrameType.STARTED)
        head = FIELD.pack(Tag.NAME, 1 << 30)
        await self.send(frame.channel, FrameType.DATA, head + b"n" * (INITIAL_WINDOW - len(head)))


class ConnectFlood(Agent):
    """Answers CONNECT with STARTED, then full DATA frames without end, ignoring the window: a
    guest's server that floods a host that does not read, with an agent that does not keep to it."""

    async def handle(self, frame: Frame) -> None:
        if frame.type is not FrameType.CONNECT:
            await super().handle(frame)
            return
        channel = frame.channel
        await self.send(channel, FrameType.STARTED)

        async def more() -> int:
            await self.send(channel, FrameType.DATA, b"a" * MAX_PAYLOAD)
            return MAX_PAYLOAD

        self.spawn(flood(more))


class OldAgent(Agent):
    """A well-behaved agent of protocol version 2, from before background commands: it knows no
    JOBS, ATTACH, INPUT, KILL, WAIT or RENAME, and would break the connection on one."""

    async def on_hello(self) -> None:
        record = [(Tag.VERSION, 2), (Tag.MAGIC, MAGIC), (Tag.MESSAGE, "agentkernel-agent protocol 2")]
        await self.send(0, FrameType.HELLO, encode_record(record))

    async def handle(self, frame: Frame) -> None:
        if frame.type >= FrameType.RENAME:
            self.writer.close()  # as the real agent of version 2 does on an unknown frame type
            return
        await super().handle(frame)


BEHAVIOURS: dict[str, type[Agent]] = {
    "good": Agent,
    "silent": Silent,
    "double-hello": DoubleHello,
    "deaf": Deaf,
    "silent-exec": SilentExec,
    "no-exit": NoExit,
    "garbage": Garbage,
    "garbage-after-hello": GarbageAfterHello,
    "oversized": Oversized,
    "unknown-channel": UnknownChannel,
    "flood": Flood,
    "tiny-frames": TinyFrames,
    "empty-frames": EmptyFrames,
    "control-flood": ControlFlood,
    "started-twice": StartedTwice,
    "after-exit": AfterExit,
    "jobs-flood": JobsFlood,
    "attach-stall": AttachStall,
    "attach-flood": AttachFlood,
    "watch-huge-field": WatchHugeField,
    "old-agent": OldAgent,
    "connect-flood": ConnectFlood,
}


async def serve(path: Path, behaviour: type[Agent]) -> None:
    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await behaviour(reader, writer).serve()

    # Bound under another name and renamed once listening: a host that connects as soon as the path
    # exists must not find a socket that refuses it.
    bound = path.with_name(path.name + ".new")
    server = await asyncio.start_unix_server(connected, path=str(bound))
    bound.rename(path)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    socket_path, name = sys.argv[1:]
    asyncio.run(serve(Path(socket_path), BEHAVIOURS[name]))
