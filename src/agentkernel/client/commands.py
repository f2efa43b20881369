"""Background commands in the SDK: `CommandHandle` (sync) and `AsyncCommandHandle`, what
`Sandbox.run(..., background=True)`, `Sandbox.connect_command(id)` and their async twins return.

A background command belongs to its sandbox: it runs on when the handle, the client or the whole
program is gone, until it exits, its timeout is up, or the sandbox stops. Its stdout and stderr are
one stream, of which the sandbox keeps the last 1 MiB: a handle (a new one too, after a restart)
reads it from the start, and `lost` says where older output was dropped.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agentkernel.client._common import (
    ApiError,
    ExitEvent,
    OutputCallback,
    dropped,
    exit_event,
    problem_error,
    sandbox_path,
    transport_errors,
)

if TYPE_CHECKING:
    from agentkernel.client.aio import AsyncClient
    from agentkernel.client.sync import Client

KILL = "KILL"


@dataclass(frozen=True)
class CommandInfo:
    """A background command as its sandbox lists it."""

    id: int
    pid: int
    command: tuple[str, ...]
    """Its arguments (the sandbox keeps their first 512 bytes)."""
    state: Literal["running", "exited"]
    started_at: str
    output_bytes: int
    """Bytes of output it has written, stdout and stderr together."""
    output_lost: int
    """Bytes at the start of its output that the sandbox no longer keeps (it keeps the last 1 MiB)."""
    exit: ExitEvent | None


@dataclass(frozen=True)
class CommandOutput:
    """A chunk of a background command's output as it arrived (not a line), decoded as UTF-8: it
    starts at byte `offset` of all the command wrote; `next_offset` is where to read on from;
    `lost` bytes right before it were dropped by the sandbox before anyone read them."""

    data: str
    offset: int
    next_offset: int
    lost: int = 0


def command_info(data: dict[str, Any]) -> CommandInfo:
    ended = data.get("exit")
    return CommandInfo(
        id=data["id"],
        pid=data["pid"],
        command=tuple(data["command"]),
        state=data["state"],
        started_at=data["started_at"],
        output_bytes=data["output_bytes"],
        output_lost=data["output_lost"],
        exit=None if ended is None else exit_event(ended),
    )


def commands_path(sandbox: str, command_id: int | None = None, action: str = "") -> str:
    return sandbox_path(sandbox, "/commands" + ("" if command_id is None else f"/{command_id}") + action)


def start_body(command: Iterable[str], **settings: Any) -> dict[str, Any]:
    if isinstance(command, str):
        raise TypeError("command must be a list of arguments, like ['sh', '-c', 'echo hi']")
    return {"command": list(command), **{k: v for k, v in settings.items() if v is not None}}


def _stdin(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


class _Events:
    """Server-Sent Events of the output route, as CommandOutput chunks; `exit` is set by the exit
    event, `offset` follows what was read."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.exit: ExitEvent | None = None
        self.ended = False
        self._kind = "message"
        self._data: list[str] = []

    def line(self, line: str) -> CommandOutput | None:
        if line:
            field, _, value = line.partition(":")
            if field == "event":
                self._kind = value.removeprefix(" ")
            elif field == "data":
                self._data.append(value.removeprefix(" "))
            return None
        kind, text = self._kind, "\n".join(self._data)
        self._kind, self._data = "message", []
        if not text:
            return None
        payload = json.loads(text)
        if kind == "output":
            self.offset = payload["next_offset"]
            return CommandOutput(payload["data"], payload["offset"], payload["next_offset"], payload["lost"])
        if kind == "exit":
            self.exit, self.offset, self.ended = exit_event(payload), payload["offset"], True
        elif kind == "end":
            self.offset, self.ended = payload["offset"], True
        elif kind == "error":
            raise problem_error(payload.get("status", 500), text.encode())
        return None


class CommandHandle:
    """A background command in a sandbox (blocking). Iterating it yields its output from the start
    (as CommandOutput chunks) until it exits; `exit` is then set. `on_stdout`, if given when it was
    started, is called with each chunk `wait()` reads (stdout and stderr together: one stream)."""

    def __init__(
        self, client: Client, sandbox: str, command_id: int, pid: int, on_stdout: OutputCallback | None = None
    ) -> None:
        self._client = client
        self.sandbox = sandbox
        self.id = command_id
        self.pid = pid
        self.exit: ExitEvent | None = None
        self._on_stdout = on_stdout

    def __repr__(self) -> str:
        return f"CommandHandle(sandbox={self.sandbox!r}, id={self.id}, pid={self.pid})"

    def __iter__(self) -> Iterator[CommandOutput]:
        return self.output()

    def output(
        self, *, offset: int = 0, follow: bool = True, on_output: OutputCallback | None = None
    ) -> Generator[CommandOutput, None, None]:
        """Its output from byte `offset` (0: the start the sandbox keeps): until it exits with
        `follow`, else until what it wrote so far. `on_output` is called with each chunk's text
        before it is yielded. Closing the iterator stops reading; the command runs on."""
        client = self._client
        url = commands_path(self.sandbox, self.id, "/output")
        params = {"offset": offset, "follow": "true" if follow else "false"}
        events = _Events(offset)
        with transport_errors(client.base_url), client._http.stream("GET", url, params=params) as response:
            if response.is_error:
                raise problem_error(response.status_code, response.read())
            for line in response.iter_lines():
                if (chunk := events.line(line)) is not None:
                    if on_output is not None:
                        on_output(chunk.data)
                    yield chunk
                if events.ended:
                    self.exit = events.exit or self.exit
                    return
        raise dropped(client.base_url)

    def wait(self, *, on_output: OutputCallback | None = None) -> ExitEvent:
        """Wait for it to exit; how it ended. With `on_output` (or the `on_stdout` it was started
        with) its output is read from the start meanwhile, each chunk passed to the callback."""
        callback = on_output or self._on_stdout
        if callback is not None:
            for _ in self.output(on_output=callback):
                pass
            assert self.exit is not None
            return self.exit
        response = self._client._request("POST", commands_path(self.sandbox, self.id, "/wait"), timeout=None)
        self.exit = exit_event(response.json())
        return self.exit

    def info(self) -> CommandInfo:
        return command_info(self._client._request("GET", commands_path(self.sandbox, self.id)).json())

    def kill(self, signal: str | int = KILL) -> bool:
        """Send `signal` (default KILL: it and every process it started end); False if it had
        exited already."""
        try:
            self._client._request(
                "POST", commands_path(self.sandbox, self.id, "/signal"), json={"signal": signal}
            )
        except ApiError as exc:
            if exc.code == "background_command_exited":
                return False
            raise
        return True

    def send_stdin(self, data: bytes | str) -> None:
        """Write to its stdin (text is sent as UTF-8)."""
        self._client._request("POST", commands_path(self.sandbox, self.id, "/stdin"), content=_stdin(data))

    def close_stdin(self) -> None:
        self._client._request("POST", commands_path(self.sandbox, self.id, "/stdin"), params={"eof": "true"})


class AsyncCommandHandle:
    """A background command in a sandbox (asyncio): as CommandHandle, with coroutines; `async for`
    over it yields its output from the start until it exits. Callbacks may be coroutine functions."""

    def __init__(
        self,
        client: AsyncClient,
        sandbox: str,
        command_id: int,
        pid: int,
        on_stdout: OutputCallback | None = None,
    ) -> None:
        self._client = client
        self.sandbox = sandbox
        self.id = command_id
        self.pid = pid
        self.exit: ExitEvent | None = None
        self._on_stdout = on_stdout

    def __repr__(self) -> str:
        return f"AsyncCommandHandle(sandbox={self.sandbox!r}, id={self.id}, pid={self.pid})"

    def __aiter__(self) -> AsyncIterator[CommandOutput]:
        return self.output()

    async def output(
        self, *, offset: int = 0, follow: bool = True, on_output: OutputCallback | None = None
    ) -> AsyncGenerator[CommandOutput, None]:
        """As CommandHandle.output; close the iterator (`aclose`) to stop reading early."""
        client = self._client
        url = commands_path(self.sandbox, self.id, "/output")
        params = {"offset": offset, "follow": "true" if follow else "false"}
        events = _Events(offset)
        with transport_errors(client.base_url):
            async with client._http.stream("GET", url, params=params) as response:
                if response.is_error:
                    raise problem_error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if (chunk := events.line(line)) is not None:
                        if on_output is not None and inspect.isawaitable(called := on_output(chunk.data)):
                            await called
                        yield chunk
                    if events.ended:
                        self.exit = events.exit or self.exit
                        return
        raise dropped(client.base_url)

    async def wait(self, *, on_output: OutputCallback | None = None) -> ExitEvent:
        """As CommandHandle.wait."""
        callback = on_output or self._on_stdout
        if callback is not None:
            async for _ in self.output(on_output=callback):
                pass
            assert self.exit is not None
            return self.exit
        path = commands_path(self.sandbox, self.id, "/wait")
        self.exit = exit_event((await self._client._request("POST", path, timeout=None)).json())
        return self.exit

    async def info(self) -> CommandInfo:
        return command_info((await self._client._request("GET", commands_path(self.sandbox, self.id))).json())

    async def kill(self, signal: str | int = KILL) -> bool:
        """As CommandHandle.kill."""
        try:
            path = commands_path(self.sandbox, self.id, "/signal")
            await self._client._request("POST", path, json={"signal": signal})
        except ApiError as exc:
            if exc.code == "background_command_exited":
                return False
            raise
        return True

    async def send_stdin(self, data: bytes | str) -> None:
        path = commands_path(self.sandbox, self.id, "/stdin")
        await self._client._request("POST", path, content=_stdin(data))

    async def close_stdin(self) -> None:
        path = commands_path(self.sandbox, self.id, "/stdin")
        await self._client._request("POST", path, params={"eof": "true"})
