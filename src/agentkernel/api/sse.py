"""A running command as Server-Sent Events, sent as the guest produces output (not after).

Events: `started` {pid}, then `stdout` / `stderr` {data} as output arrives, then `exit` {exit_code,
signal, timed_out} or `error` (a problem). A comment line goes out every 15 s of silence, so proxies keep
the stream open and a client that left is noticed: its command is then killed and its sandbox cleaned up.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from agentkernel.api.problems import from_exception
from agentkernel.errors import AgentkernelError
from agentkernel.protocol.connection import Output, Process

KEEPALIVE = 15.0
QUEUED_CHUNKS = 8  # output waiting for a slow client; beyond it the guest process is slowed down


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class ClosingStreamingResponse(StreamingResponse):
    """Streams `chunks` (after `first`) and closes them however the response ends, so their cleanup
    (killing a command, ending a file transfer in the guest) runs at once, not when they are collected.
    """

    def __init__(
        self,
        first: bytes,
        chunks: AsyncGenerator[bytes, None],
        *,
        media_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._chunks = chunks
        super().__init__(self._body(first), media_type=media_type, headers=headers)

    async def _body(self, first: bytes) -> AsyncGenerator[bytes, None]:
        if first:
            yield first
        async for chunk in self._chunks:
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._chunks.aclose()


class EventStreamResponse(ClosingStreamingResponse):
    def __init__(self, first: bytes, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(
            first,
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def stream_process(
    opening: AbstractAsyncContextManager[Process], *, stdin: bytes | None
) -> EventStreamResponse:
    """Start the command `opening` yields and answer with its events.

    Failures up to the start of the command (no such sandbox, no such program) raise here, so they
    become ordinary problem responses; `opening` is left when the stream ends.
    """
    stack = contextlib.AsyncExitStack()
    try:
        proc = await stack.enter_async_context(opening)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise
    events = _events(stack, proc, stdin)
    first = await anext(events)  # from here on, closing `events` (even by GC) cleans up
    return EventStreamResponse(first, events)


async def _events(
    stack: contextlib.AsyncExitStack, proc: Process, stdin: bytes | None
) -> AsyncGenerator[bytes, None]:
    async with stack:
        send, receive = anyio.create_memory_object_stream[Output](QUEUED_CHUNKS)
        pump = asyncio.create_task(_pump(proc, send))
        feeder = asyncio.create_task(_feed(proc, stdin or b""))
        decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")}
        try:
            yield event("started", {"pid": proc.pid})
            async with receive:
                while True:
                    chunk: Output | None = None
                    with anyio.move_on_after(KEEPALIVE):
                        try:
                            chunk = await receive.receive()
                        except anyio.EndOfStream:
                            break
                    if chunk is None:
                        yield b": keepalive\n\n"
                    elif text := decoders[chunk.stream].decode(chunk.data):
                        yield event(chunk.stream, {"data": text})
            await pump  # raises what ended the output early, if anything
            for stream, decoder in decoders.items():
                if tail := decoder.decode(b"", final=True):
                    yield event(stream, {"data": tail})
            assert proc.status is not None
            status = proc.status
            yield event(
                "exit",
                {"exit_code": status.exit_code, "signal": status.signal, "timed_out": status.timed_out},
            )
        except AgentkernelError as exc:
            yield event("error", from_exception(exc).model_dump(exclude_none=True))
        finally:
            proc.abandon()
            for task in (pump, feeder):
                task.cancel()
            await asyncio.gather(pump, feeder, return_exceptions=True)


async def _pump(proc: Process, send: MemoryObjectSendStream[Output]) -> None:
    async with send:
        async for chunk in proc.output():
            await send.send(chunk)


async def _feed(proc: Process, data: bytes) -> None:
    with contextlib.suppress(AgentkernelError):
        await proc.write(data)
        await proc.close_stdin()
