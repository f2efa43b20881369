"""Talking to the pool daemon: its socket, its pid file, one request at a time.

Requests and replies are single JSON lines on a Unix socket in the user's private runtime directory.
"""

from __future__ import annotations

import hashlib
import json
import socket

from agentkernel import paths
from agentkernel.errors import AgentkernelError, DaemonUnavailable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time: the thin CLI)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any

MAX_LINE = 1 << 20  # a status reply with many sandboxes stays far below this
MAX_REQUEST = 60 * 1024
"""The longest request line a client sends (the daemon reads a little more before it refuses)."""
SEND_FD = {"ok": True, "send": "fd"}
"""The daemon's line asking a `cp` client for its open host file (sent as SCM_RIGHTS data)."""


def socket_path() -> Path:
    """One daemon per data dir: the socket's name is derived from the data dir's path."""
    tag = hashlib.sha256(str(paths.data_dir().resolve()).encode()).hexdigest()[:12]
    return paths.runtime_dir() / f"pool-{tag}.sock"


def pid_file() -> Path:
    return paths.data_dir() / "daemon.pid"


def request(message: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request and return the daemon's reply; DaemonUnavailable when none is running."""
    path = socket_path()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_LINE:
                    raise AgentkernelError("the pool daemon's reply is too long")
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonUnavailable(
            "the pool daemon is not running (start it with `agentkernel daemon start`)"
        ) from None
    except OSError as exc:
        raise DaemonUnavailable(f"the pool daemon did not answer: {exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise AgentkernelError("the pool daemon sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise AgentkernelError("the pool daemon sent a malformed reply")
    if not reply.get("ok"):
        raise AgentkernelError(f"the pool daemon refused: {reply.get('error', 'no reason given')}")
    return reply


def parsed(line: bytes, ops: Sequence[str]) -> dict[str, Any] | None:
    """The request on `line` if it is one of `ops` (else None: another part of the daemon answers it)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("op") in ops else None


def acquire(key: str) -> str | None:
    """A ready sandbox of kind `key`, now the caller's; None when no daemon runs or it has none."""
    try:
        name = request({"op": "acquire", "key": key}, timeout=2.0).get("sandbox")
    except AgentkernelError:
        return None
    return name if isinstance(name, str) else None
