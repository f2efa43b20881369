"""The MCP server's background command tools: start a command that runs on by itself, list them, read
its output (bounded as run_command's is: head and tail, with a line saying how to read the rest),
send it input, kill it, wait for it.

`command_tools` gives each tool function with its annotations; `server.build_server` registers them
like its own (and turns the service's errors into tool errors).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any

from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from agentkernel.errors import BackgroundCommandError
from agentkernel.mcp_server.server import (
    Captured,
    CommandArg,
    Cwd,
    Env,
    Name,
    Offset,
    OutputLimit,
    Timeout,
    hints,
)
from agentkernel.mcp_server.server import _command as command_spec
from agentkernel.protocol.connection import BackgroundInfo, ExitStatus
from agentkernel.service.service import SandboxService

CommandId = Annotated[int, Field(description="The background command's id (from start_command).", ge=1)]
MAX_WAIT = 600.0


class CommandStarted(BaseModel):
    id: int = Field(description="Its id, for the other command tools.")
    pid: int
    detail: str


class CommandState(BaseModel):
    id: int
    running: bool
    exit_code: int | None = Field(default=None, description="Once it exited; None if a signal ended it.")
    signal: int | None = Field(default=None, description="The signal that ended it, if one did.")
    timed_out: bool = Field(default=False, description="It was killed for running past its timeout.")

    @classmethod
    def of(cls, command_id: int, status: ExitStatus | None) -> CommandState:
        if status is None:
            return cls(id=command_id, running=True)
        return cls(
            id=command_id,
            running=False,
            exit_code=status.exit_code,
            signal=status.signal,
            timed_out=status.timed_out,
        )


class CommandEntry(CommandState):
    command: list[str]
    output_bytes: int = Field(description="Bytes of output it has written (stdout and stderr together).")

    @classmethod
    def listed(cls, info: BackgroundInfo) -> CommandEntry:
        state = CommandState.of(info.id, info.status)
        return cls(**state.model_dump(), command=info.argv, output_bytes=info.output_size)


class CommandList(BaseModel):
    commands: list[CommandEntry]


class CommandOutput(CommandState):
    output: str = Field(
        description="Its stdout and stderr together, from offset; when truncated, head and tail and a "
        "line between saying how to read what was left out."
    )
    offset: int = Field(description="Where in all its output this starts.")
    next_offset: int = Field(description="The offset to read on from (later output comes from there).")
    lost: int = Field(description="Bytes before offset that are gone: the sandbox keeps the last 1 MiB.")
    truncated: bool = Field(description="Part of the output read is not shown here.")


class Done(BaseModel):
    ok: bool = True
    detail: str


@contextlib.contextmanager
def about(name: str, command_id: int) -> Iterator[None]:
    """The guest's answer about a command, with what to do next in tool terms."""
    try:
        yield
    except BackgroundCommandError as exc:
        advice = {
            "background_command_not_found": f"sandbox {name} has no background command {command_id}: "
            "list_commands shows its commands (they end when the sandbox stops)",
            "background_command_exited": f"background command {command_id} has exited: wait_command "
            "gives its exit status, read_command_output its output",
            "stdin_closed": f"the stdin of background command {command_id} is closed (or it has exited): "
            "start the command again to give it input",
            "stdin_full": f"background command {command_id} is not reading its input: try again later",
        }
        raise BackgroundCommandError(advice.get(exc.code, str(exc)), exc.errno) from None


def command_tools(
    sandboxes: SandboxService, default_limit: int
) -> list[tuple[Callable[..., Awaitable[Any]], ToolAnnotations]]:
    async def start_command(
        name: Name, command: CommandArg, cwd: Cwd = None, env: Env = None, timeout: Timeout = None
    ) -> CommandStarted:
        """Start a command in the background in a running sandbox and return its id at once. It runs
        on by itself (stdout and stderr together kept in the sandbox's last 1 MiB) until it exits,
        its timeout is up, or the sandbox stops: read_command_output, send_command_input,
        kill_command and wait_command take its id."""
        started = await sandboxes.start_command(name, command_spec(command, env, cwd, timeout))
        return CommandStarted(id=started.id, pid=started.pid, detail=f"started command {started.id}")

    async def list_commands(name: Name) -> CommandList:
        """List a sandbox's background commands, running and exited, oldest first."""
        return CommandList(commands=[CommandEntry.listed(i) for i in await sandboxes.list_commands(name)])

    async def read_command_output(
        name: Name, id: CommandId, offset: Offset = 0, output_limit: OutputLimit = None
    ) -> CommandOutput:
        """Read what a background command has written so far (stdout and stderr together) from
        `offset`; does not wait for more. Past the limit, the head and tail are shown, with a line
        saying the offset to read the rest from. next_offset is where newer output starts."""
        limit = output_limit or default_limit
        captured = Captured(limit)
        with about(name, id):
            reader = await sandboxes.command_output(name, id, offset=offset, follow=False)
            start, lost = reader.offset, 0  # the guest moves an offset of lost output up
            try:
                async for chunk in reader.output():
                    lost += chunk.lost
                    captured.add(chunk.data)
            finally:
                reader.close()
            lost = lost or max(0, start - offset)
            status = reader.status or (await sandboxes.command_info(name, id)).status

        def where(skipped: int) -> str:
            return f'read_command_output(name="{name}", id={id}, offset={start + skipped}) reads them'

        shown, cut = captured.shown(limit, where)
        if lost:
            shown = f"[... {lost} bytes before this are lost: the sandbox keeps the last 1 MiB ...]\n" + shown
        state = CommandState.of(id, status).model_dump()
        return CommandOutput(
            **state,
            output=shown,
            offset=start,
            next_offset=reader.offset,
            lost=lost,
            truncated=cut,
        )

    async def send_command_input(
        name: Name,
        id: CommandId,
        input: Annotated[str, Field(description="Text for its stdin (add a newline to end a line).")] = "",
        eof: Annotated[bool, Field(description="Close its stdin afterwards (end of input).")] = False,
    ) -> Done:
        """Write text to a background command's stdin; with eof, close it afterwards."""
        with about(name, id):
            await sandboxes.command_stdin(name, id, input.encode(), eof=eof)
        return Done(detail=f"sent {len(input.encode())} bytes" + (" and closed its stdin" if eof else ""))

    async def kill_command(
        name: Name,
        id: CommandId,
        signal: Annotated[
            str, Field(description="Signal name (TERM asks it to end, KILL ends it and all it started).")
        ] = "TERM",
    ) -> Done:
        """Send a signal to a background command (and the processes it started)."""
        with about(name, id):
            signo = await sandboxes.signal_command(name, id, signal)
        return Done(detail=f"sent signal {signo} to command {id}")

    async def wait_command(
        name: Name,
        id: CommandId,
        timeout: Annotated[
            float,
            Field(description=f"Seconds to wait at most (up to {MAX_WAIT:g}); then running is true.", gt=0),
        ] = 60.0,
    ) -> CommandState:
        """Wait for a background command to exit, up to `timeout` seconds; its exit status (or
        running: true if it still runs)."""
        with about(name, id):
            try:
                status: ExitStatus | None = await asyncio.wait_for(
                    sandboxes.wait_command(name, id), min(timeout, MAX_WAIT)
                )
            except TimeoutError:
                status = None
        return CommandState.of(id, status)

    runs = hints(read_only=False, destructive=True, idempotent=False, open_world=True)
    reads = hints(read_only=True, destructive=False, idempotent=True, open_world=False)
    changes = hints(read_only=False, destructive=True, idempotent=False, open_world=False)
    return [
        (start_command, runs),
        (list_commands, reads),
        (read_command_output, reads),
        (send_command_input, changes),
        (kill_command, changes),
        (wait_command, reads),
    ]
