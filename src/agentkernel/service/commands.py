"""Background commands of a running sandbox: started detached, they belong to the sandbox's agent,
not to the caller, so they run on after the client that started them went away and end with the
sandbox. The guest keeps each one's last 1 MiB of output (stdout and stderr as one stream, in the
order written), which any number of readers read from any offset (docs/protocol.md, Background
commands). Here are the checks and views `SandboxService` uses for them: every face reaches them
through the service, which checks input before it looks the sandbox up.
"""

from __future__ import annotations

import errno
import signal as signals
from datetime import UTC, datetime
from typing import Any

from agentkernel.errors import BackgroundCommandError, InvalidRequestError
from agentkernel.protocol.connection import BackgroundInfo

MAX_STDIN = 1 << 20
"""Bytes one request may send to a command's stdin (the guest queues 256 KiB; the rest waits)."""


def check_command_id(command_id: int, *, field: str = "command_id") -> int:
    if not 0 < command_id < 1 << 31:
        raise InvalidRequestError(
            field, f"must be a background command's id, a positive number (got {command_id})"
        )
    return command_id


def check_offset(offset: int, *, field: str = "offset") -> int:
    if offset < 0:
        raise InvalidRequestError(field, f"must be 0 or more (got {offset})")
    return offset


def parse_signal(signal: str | int, *, field: str = "signal") -> int:
    """A signal given as a number (15), a name (TERM, SIGTERM; any case) or the number as text."""
    text = str(signal).strip()
    if text.isdigit():
        number = int(text)
        if number in {s.value for s in signals.Signals}:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in signals.Signals.__members__ and not name.startswith("SIG_"):
            return int(signals.Signals[name])
    raise InvalidRequestError(
        field, f"{text!r} is no signal: give a name like TERM, KILL, INT, or its number"
    )


def as_dict(info: BackgroundInfo) -> dict[str, Any]:
    """What a face shows of a background command (the API's CommandView, `commands --json`)."""
    status = info.status
    return {
        "id": info.id,
        "pid": info.pid,
        "command": info.argv,
        "state": "running" if info.running else "exited",
        "started_at": datetime.fromtimestamp(info.started_ns / 1e9, UTC).isoformat(),
        "output_bytes": info.output_size,
        "output_lost": info.output_lost,
        "exit": None
        if status is None
        else {"exit_code": status.exit_code, "signal": status.signal, "timed_out": status.timed_out},
    }


def check_stdin(data: bytes, *, field: str = "stdin") -> bytes:
    if len(data) > MAX_STDIN:
        raise InvalidRequestError(field, f"at most {MAX_STDIN} bytes at a time (got {len(data)})")
    return data


def find(commands: list[BackgroundInfo], command_id: int) -> BackgroundInfo:
    for info in commands:
        if info.id == command_id:
            return info
    raise BackgroundCommandError(f"no background command {command_id}", errno.ESRCH)
