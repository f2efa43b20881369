"""The host side of the protocol against a scripted, misbehaving guest on a real Unix socket.

The guest here is a stand-in written in the test: it lets each way of breaking the protocol be sent on
purpose, which a well-behaved agent never does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agentkernel.errors import AgentConnectionError, AgentkernelError, ExecError
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import (
    HEADER,
    INITIAL_WINDOW,
    MAGIC,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameType,
    Tag,
    encode,
    encode_record,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HELLO = encode(
    0, FrameType.HELLO, encode_record([(Tag.VERSION, 1), (Tag.MAGIC, MAGIC), (Tag.MESSAGE, "fake")])
)


async def read_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> tuple[int, FrameType, bytes]:
    while True:
        frames = decoder.feed(await reader.read(65536))
        if frames:
            f = frames[0]
            return f.channel, f.type, f.payload


async def with_guest(tmp_path: Path, script: Script, body: Callable[[Connection], Awaitable[None]]) -> None:
    sock = tmp_path / "agent.sock"
    server = await asyncio.start_unix_server(script, path=str(sock))
    try:
        conn = await Connection.open_unix(sock, timeout=5)
        try:
            await body(conn)
        finally:
            await conn.close()
    finally:
        server.close()


def greeting_then(
    after: Callable[[asyncio.StreamReader, asyncio.StreamWriter, FrameDecoder], Awaitable[None]],
) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        await read_frame(reader, decoder)
        writer.write(HELLO)
        await writer.drain()
        await after(reader, writer, decoder)
        await asyncio.sleep(5)

    return script


def started(channel: int) -> bytes:
    return encode(channel, FrameType.STARTED, encode_record([(Tag.PID, 42)]))


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_oversized_frame_breaks_only_that_connection(tmp_path: Path) -> None:
    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dec: FrameDecoder) -> None:
        ch, _, _ = await read_frame(reader, dec)
        writer.write(started(ch) + HEADER.pack(MAX_PAYLOAD * 64, ch, FrameType.STDOUT, 0))
        await writer.drain()

    async def body(conn: Connection) -> None:
        await conn.hello(timeout=5)
        with pytest.raises(AgentConnectionError, match="exceeds"):
            proc = await conn.exec(["true"])
            await proc.wait()
        assert conn.broken

    run(with_guest(tmp_path, greeting_then(after), body))


def test_data_beyond_the_window_is_a_violation(tmp_path: Path) -> None:
    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dec: FrameDecoder) -> None:
        ch, _, _ = await read_frame(reader, dec)
        writer.write(started(ch))
        for _ in range(INITIAL_WINDOW // MAX_PAYLOAD + 2):
            writer.write(encode(ch, FrameType.STDOUT, b"x" * MAX_PAYLOAD))
        await writer.drain()

    async def body(conn: Connection) -> None:
        await conn.hello(timeout=5)
        proc = await conn.exec(["yes"])
        await asyncio.sleep(0.5)  # let the flood arrive before anything is consumed
        with pytest.raises(AgentConnectionError, match="window"):
            await proc.wait()

    run(with_guest(tmp_path, greeting_then(after), body))


def test_frame_on_unopened_channel(tmp_path: Path) -> None:
    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dec: FrameDecoder) -> None:
        writer.write(encode(999, FrameType.STDOUT, b"boo"))
        await writer.drain()

    async def body(conn: Connection) -> None:
        with pytest.raises(AgentConnectionError, match="not open"):  # it may come with the HELLO
            await conn.hello(timeout=5)
            await asyncio.sleep(0.2)
            await conn.ping(timeout=5)

    run(with_guest(tmp_path, greeting_then(after), body))


def test_silent_guest_times_out(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async def body(conn: Connection) -> None:
        with pytest.raises(AgentConnectionError, match="did not answer"):
            await conn.hello(timeout=0.5)

    run(with_guest(tmp_path, silent, body))


def test_garbage_instead_of_hello(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\xff" * 64)
        await writer.drain()
        await asyncio.sleep(5)

    async def body(conn: Connection) -> None:
        with pytest.raises(AgentConnectionError, match="broke the protocol"):
            await conn.hello(timeout=5)

    run(with_guest(tmp_path, garbage, body))


def test_exec_error_and_exit_status(tmp_path: Path) -> None:
    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dec: FrameDecoder) -> None:
        ch, _, _ = await read_frame(reader, dec)
        error = encode_record([(Tag.MESSAGE, "no such file: nope"), (Tag.ERRNO, 2)])
        writer.write(encode(ch, FrameType.ERROR, error))
        ch, _, _ = await read_frame(reader, dec)
        writer.write(
            started(ch) + encode(ch, FrameType.STDERR, b"err") + encode(ch, FrameType.STDOUT, b"out")
        )
        writer.write(encode(ch, FrameType.EXIT, encode_record([(Tag.SIGNAL, 9)])))
        await writer.drain()

    async def body(conn: Connection) -> None:
        await conn.hello(timeout=5)
        with pytest.raises(ExecError) as info:
            await conn.exec(["nope"])
        assert info.value.errno == 2
        done = await conn.run(["sh"])
        assert (done.stdout, done.stderr, done.status.shell_code) == (b"out", b"err", 137)

    run(with_guest(tmp_path, greeting_then(after), body))


def test_closed_connection_gives_a_clear_error(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def body(conn: Connection) -> None:
        with pytest.raises(AgentkernelError, match=r"closed the connection|lost the connection"):
            await conn.hello(timeout=5)

    run(with_guest(tmp_path, hang_up, body))
