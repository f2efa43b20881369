"""WebSocket /sandboxes/{name}/attach: an interactive program on a terminal (PTY) in the sandbox.

Query: `rows`, `cols` (the terminal size), `command` (repeated, one per argument; default: a login
shell) and `tty` (default true; false runs the program on pipes). The client sends binary messages
(keystrokes, to the program's terminal, or bytes for its stdin) and text messages with JSON controls:
{"type": "resize", "rows": R, "cols": C}, {"type": "signal", "signal": N} and {"type": "eof"}. The
server sends the program's output as binary messages and, when the program exits, the text message
{"type": "exit", "exit_code": ..., "signal": ..., "timed_out": ...}, then closes. A request that fails
before the program starts is answered with an HTTP problem response.

Messages are handled in order: the data sent before an `eof` reaches the program first. On pipes,
`eof` closes the program's stdin; a terminal has no such thing, so the guest types the EOF character
(twice after a partial line, as a user would), and a line in canonical mode holds at most 4095 bytes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from agentkernel.api.problems import from_exception, response
from agentkernel.api.routes import Name
from agentkernel.errors import AgentkernelError
from agentkernel.protocol.connection import Process
from agentkernel.service.checks import LOGIN_SHELL
from agentkernel.service.service import CommandSpec, SandboxService

router = APIRouter()


@router.websocket("/sandboxes/{name}/attach")
async def attach(
    websocket: WebSocket,
    name: Name,
    rows: Annotated[int, Query(ge=1, le=1000)] = 24,
    cols: Annotated[int, Query(ge=1, le=1000)] = 80,
    command: Annotated[list[str] | None, Query()] = None,
    tty: bool = True,
) -> None:
    sandboxes: SandboxService = websocket.app.state.service
    try:
        env = {"TERM": "xterm-256color"} if tty else {}
        spec = CommandSpec.checked(command or LOGIN_SHELL, env=env)
        proc = await sandboxes.exec(name, spec, pty=(rows, cols) if tty else None)
    except AgentkernelError as exc:
        await websocket.send_denial_response(response(from_exception(exc)))
        return
    try:
        await websocket.accept()
        async with anyio.create_task_group() as group:
            group.start_soon(_from_client, websocket, proc)
            await _to_client(websocket, proc)
            group.cancel_scope.cancel()
    except (WebSocketDisconnect, AgentkernelError):
        pass  # the client left, or the sandbox went away: the program is ended below
    finally:
        proc.abandon()


async def _to_client(websocket: WebSocket, proc: Process) -> None:
    async for chunk in proc.output():
        await websocket.send_bytes(chunk.data)
    assert proc.status is not None
    status = proc.status
    await websocket.send_text(
        json.dumps(
            {
                "type": "exit",
                "exit_code": status.exit_code,
                "signal": status.signal,
                "timed_out": status.timed_out,
            }
        )
    )
    await websocket.close()


async def _from_client(websocket: WebSocket, proc: Process) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("bytes"):
            await proc.write(message["bytes"])
        elif message.get("text"):
            await _control(websocket, proc, message["text"])


async def _control(websocket: WebSocket, proc: Process, text: str) -> None:
    try:
        control: Any = json.loads(text)
        kind = control["type"]
        if kind == "resize":
            await proc.resize(_bounded(control["rows"]), _bounded(control["cols"]))
        elif kind == "signal":
            await proc.signal(_bounded(control["signal"], 64))
        elif kind == "eof":
            await proc.close_stdin()
        else:
            raise ValueError(f"unknown control type {kind!r}")
    except (ValueError, KeyError, TypeError) as exc:
        await websocket.send_text(
            json.dumps({"type": "error", "code": "invalid_control", "detail": str(exc)})
        )


def _bounded(value: object, most: int = 1000) -> int:
    if not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"expected an integer from 1 to {most}, got {value!r}")
    return value
