"""Background commands of a running sandbox: start one detached, list them, read (and follow) a
command's output from any offset as Server-Sent Events, send it stdin, signal it, wait for its exit.

A background command belongs to the sandbox, not to the request that started it: it runs on after
every client went away, until it exits, its timeout is up, or the sandbox stops. Its stdout and stderr
are one stream; the sandbox keeps the last 1 MiB of it.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncGenerator
from typing import Annotated, Literal

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from agentkernel.api.models import Command, Started, Timeout
from agentkernel.api.problems import from_exception
from agentkernel.api.routes import BODY, SSE, Name, Service, problems
from agentkernel.api.sse import KEEPALIVE, QUEUED_CHUNKS, EventStreamResponse, event
from agentkernel.errors import AgentkernelError
from agentkernel.protocol.connection import Attachment, BackgroundInfo, BackgroundOutput, ExitStatus
from agentkernel.service.commands import MAX_STDIN, as_dict
from agentkernel.service.service import CommandSpec

router = APIRouter(tags=["commands"], responses=problems(401, 422))
CommandId = Annotated[int, Path(ge=1, description="The background command's id (from starting it).")]


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: Command
    env: dict[str, str] | None = None
    cwd: str | None = Field(None, description="Working directory in the sandbox (absolute).")
    timeout: Timeout | None = None


class ExitView(BaseModel):
    exit_code: int | None = Field(description="None when the command was killed by a signal.")
    signal: int | None
    timed_out: bool

    @classmethod
    def of(cls, status: ExitStatus) -> ExitView:
        return cls(exit_code=status.exit_code, signal=status.signal, timed_out=status.timed_out)


class CommandView(BaseModel):
    id: int
    pid: int
    command: list[str] = Field(description="Its arguments (the sandbox keeps their first 512 bytes).")
    state: Literal["running", "exited"]
    started_at: str = Field(description="When it started (UTC, ISO 8601, by the sandbox's clock).")
    output_bytes: int = Field(description="Bytes of output it has written (stdout and stderr together).")
    output_lost: int = Field(
        description="Bytes at the start of its output that are gone: the sandbox keeps the last 1 MiB."
    )
    exit: ExitView | None = Field(description="How it ended, once it has.")

    @classmethod
    def of(cls, info: BackgroundInfo) -> CommandView:
        return cls.model_validate(as_dict(info))


class SignalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signal: str | int = Field(
        default="TERM", description="A name (TERM, KILL, INT, HUP, ...; SIG prefix optional) or a number."
    )


@router.post("/sandboxes/{name}/commands", status_code=201, responses={**BODY, **problems(404, 409, 502)})
async def start_command(name: Name, body: StartRequest, sandboxes: Service) -> Started:
    """Start a command in the background: it runs on after this request (and any client) is gone."""
    spec = CommandSpec.checked(body.command, env=body.env, cwd=body.cwd, timeout=body.timeout)
    started = await sandboxes.start_command(name, spec)
    return Started(id=started.id, pid=started.pid)


@router.get("/sandboxes/{name}/commands", responses=problems(404, 409, 502))
async def list_commands(name: Name, sandboxes: Service) -> list[CommandView]:
    """The sandbox's background commands, oldest first (ended ones too, until newer ones push them out)."""
    return [CommandView.of(info) for info in await sandboxes.list_commands(name)]


@router.get("/sandboxes/{name}/commands/{command_id}", responses=problems(404, 409, 502))
async def get_command(name: Name, command_id: CommandId, sandboxes: Service) -> CommandView:
    return CommandView.of(await sandboxes.command_info(name, command_id))


@router.get(
    "/sandboxes/{name}/commands/{command_id}/output",
    status_code=200,
    response_class=EventStreamResponse,
    responses={**SSE, **problems(404, 409, 502)},
)
async def command_output(
    name: Name,
    command_id: CommandId,
    sandboxes: Service,
    offset: Annotated[int, Query(ge=0, description="Byte offset to start at (0: the start kept).")] = 0,
    follow: Annotated[
        bool, Query(description="Keep streaming until the command exits (else: until what it wrote so far).")
    ] = True,
) -> EventStreamResponse:
    """The command's output as Server-Sent Events. `output` {offset, next_offset, data, lost}: `data`
    is UTF-8 text (invalid bytes replaced) that starts at byte `offset` of all the command wrote;
    `next_offset` is where to resume from; `lost` counts the bytes right before it that the sandbox
    no longer had. Then `exit` {exit_code, signal, timed_out, offset} once it has exited and all of
    its output was sent, or, without `follow`, `end` {offset} once what it wrote so far was sent; or
    `error` (a problem)."""
    attachment = await sandboxes.command_output(name, command_id, offset=offset, follow=follow)
    events = _events(attachment)
    first = await anext(events)  # from here on, closing `events` closes the reader
    return EventStreamResponse(first, events)


async def _events(attachment: Attachment) -> AsyncGenerator[bytes, None]:
    """The events; the first is a comment, so that closing the stream at any point (even before it
    was sent) closes the reader."""
    send, receive = anyio.create_memory_object_stream[BackgroundOutput](QUEUED_CHUNKS)
    pump = asyncio.create_task(_pump(attachment, send))  # not cancelled by a keepalive's timeout
    text = _Text(attachment.offset)
    try:
        yield b": output\n\n"
        async with receive:
            while True:
                chunk: BackgroundOutput | None = None
                with anyio.move_on_after(KEEPALIVE):
                    try:
                        chunk = await receive.receive()
                    except anyio.EndOfStream:
                        break
                if chunk is None:
                    yield b": keepalive\n\n"
                    continue
                for shown in text.add(chunk):
                    yield event("output", shown)
        await pump  # raises what ended the output early, if anything
        if tail := text.flush():
            yield event("output", tail)
        if attachment.status is not None:
            yield event("exit", {**ExitView.of(attachment.status).model_dump(), "offset": attachment.offset})
        else:
            yield event("end", {"offset": attachment.offset})
    except AgentkernelError as exc:
        yield event("error", from_exception(exc).model_dump(exclude_none=True))
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        attachment.close()


async def _pump(attachment: Attachment, send: MemoryObjectSendStream[BackgroundOutput]) -> None:
    async with send:
        async for chunk in attachment.output():
            await send.send(chunk)


class _Text:
    """Output bytes as UTF-8 text that never splits a character, with the byte offsets it spans."""

    def __init__(self, offset: int) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.start = offset  # of the first byte not yet shown
        self.end = offset  # of the byte after the last one fed
        self.lost = 0

    def add(self, chunk: BackgroundOutput) -> list[dict[str, object]]:
        """The events for `chunk`: after a gap, what was pending before it first (now final)."""
        shown = []
        if chunk.lost and (tail := self.flush()):
            shown.append(tail)
        if chunk.lost:
            self.start, self.lost = chunk.offset, self.lost + chunk.lost
        self.end = chunk.offset + len(chunk.data)
        if part := self._shown(self.decoder.decode(chunk.data)):
            shown.append(part)
        return shown

    def _shown(self, data: str) -> dict[str, object] | None:
        if not data:
            return None
        pending = len(self.decoder.getstate()[0])
        shown = {"offset": self.start, "next_offset": self.end - pending, "data": data, "lost": self.lost}
        self.start, self.lost = self.end - pending, 0
        return shown

    def flush(self) -> dict[str, object] | None:
        return self._shown(self.decoder.decode(b"", final=True))


@router.post(
    "/sandboxes/{name}/commands/{command_id}/stdin",
    status_code=204,
    responses=problems(404, 409, 413, 502),
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": f"Bytes for the command's stdin (at most {MAX_STDIN}).",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def command_stdin(
    name: Name,
    command_id: CommandId,
    request: Request,
    sandboxes: Service,
    eof: Annotated[bool, Query(description="Close its stdin after the data.")] = False,
) -> Response:
    """Send the request body to the command's stdin; with `eof`, close it afterwards. 409
    stdin_closed once it is closed (or the command ended), stdin_full while it does not read."""
    await sandboxes.command_stdin(name, command_id, await request.body(), eof=eof)
    return Response(status_code=204)


@router.post(
    "/sandboxes/{name}/commands/{command_id}/signal",
    status_code=204,
    responses={**BODY, **problems(404, 409, 502)},
)
async def signal_command(
    name: Name, command_id: CommandId, sandboxes: Service, body: SignalRequest | None = None
) -> Response:
    """Send a signal to the command's process group (KILL: to every process it started); 409
    background_command_exited once it has exited."""
    await sandboxes.signal_command(name, command_id, (body or SignalRequest()).signal)
    return Response(status_code=204)


@router.post("/sandboxes/{name}/commands/{command_id}/wait", responses=problems(404, 409, 502))
async def wait_command(name: Name, command_id: CommandId, sandboxes: Service) -> ExitView:
    """Answers once the command has exited (at once if it has): how it ended."""
    return ExitView.of(await sandboxes.wait_command(name, command_id))
