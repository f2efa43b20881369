"""What the sync and async clients share: results, events, errors, request bodies and SSE parsing."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote, urlencode

from agentkernel.errors import AgentkernelError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_URL = "http://127.0.0.1:18888"
API_KEY_ENV = "AGENTKERNEL_API_KEY"
CHUNK = 256 * 1024
T = TypeVar("T", bound="DataclassInstance")


class ApiError(AgentkernelError):
    """The server refused a request: `status` is the HTTP status, `code` the stable problem code."""

    def __init__(self, status: int, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(f"{detail} ({code})")
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None
    """None when the command was killed by a signal."""
    signal: int | None
    timed_out: bool
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class SandboxInfo:
    name: str
    status: Literal["created", "running", "stopped", "failed"]
    backend: str
    image: str
    image_digest: str
    vcpus: int
    memory_mb: int
    profile: str
    created_at: str


@dataclass(frozen=True)
class FileEntry:
    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime_ns: int


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class OutputEvent:
    stream: Literal["stdout", "stderr"]
    data: str


@dataclass(frozen=True)
class ExitEvent:
    exit_code: int | None
    signal: int | None
    timed_out: bool


Event = Started | OutputEvent | ExitEvent


def resolve_api_key(explicit: str | None) -> str | None:
    return explicit if explicit is not None else os.environ.get(API_KEY_ENV) or None


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def problem_error(status: int, body: bytes) -> ApiError:
    """The ApiError for an error response (a problem document, or anything else a proxy sent)."""
    try:
        data = json.loads(body)
        return ApiError(status, str(data["code"]), str(data["detail"]), data.get("field"))
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode(errors="replace").strip()
        return ApiError(status, "http_error", f"HTTP {status}: {text}" if text else f"HTTP {status}")


def command_body(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: str | None,
    **sandbox: Any,
) -> dict[str, Any]:
    if isinstance(command, str):
        raise TypeError("command must be a list of arguments, like ['sh', '-c', 'echo hi']")
    body = {"command": list(command), "env": env, "cwd": cwd, "timeout": timeout, "stdin": stdin, **sandbox}
    return {k: v for k, v in body.items() if v is not None}


def file_path(name: str, path: str) -> str:
    """The URL path of a guest file. `..` is refused here: URL normalization would resolve it."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r}: paths in a sandbox are absolute")
    if ".." in path.split("/"):
        raise ValueError(f"{path!r}: '..' segments are not allowed")
    return f"/sandboxes/{quote(name, safe='')}/files/{quote(path.lstrip('/'), safe='/')}"


def sandbox_path(name: str, action: str = "") -> str:
    return f"/sandboxes/{quote(name, safe='')}{action}"


def attach_url(base_url: str, name: str, command: Sequence[str] | None, rows: int, cols: int) -> str:
    """The WebSocket URL of the attach endpoint (ws:// for http://, wss:// for https://)."""
    query = urlencode([("rows", rows), ("cols", cols), *(("command", arg) for arg in command or ())])
    scheme, rest = base_url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{sandbox_path(name, '/attach')}?{query}"


def _known(cls: type[T], data: dict[str, Any]) -> T:
    """`cls` from the fields it knows: a newer server may send more."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def run_result(data: dict[str, Any]) -> RunResult:
    return _known(RunResult, data)


def sandbox_info(data: dict[str, Any]) -> SandboxInfo:
    return _known(SandboxInfo, data)


def file_entries(data: dict[str, Any]) -> list[FileEntry]:
    return [_known(FileEntry, entry) for entry in data["entries"]]


def exit_event(data: dict[str, Any]) -> ExitEvent:
    return ExitEvent(data["exit_code"], data["signal"], data["timed_out"])


def terminal_control(text: str) -> ExitEvent:
    """The exit event from a text message of an attach WebSocket (or the error it reports)."""
    control = json.loads(text)
    if control.get("type") == "exit":
        return exit_event(control)
    raise ApiError(422, str(control.get("code", "invalid_control")), str(control.get("detail", text)))


class SSEParser:
    """Server-Sent Events from text lines; `line` returns an Event when one is complete."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def line(self, line: str) -> Event | None:
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self._event = value
            elif field == "data":
                self._data.append(value)
            return None  # comments (": keepalive") and unknown fields are skipped
        kind, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        if not data:
            return None
        payload = json.loads(data)
        if kind == "started":
            return Started(payload["pid"])
        if kind == "stdout":
            return OutputEvent("stdout", payload["data"])
        if kind == "stderr":
            return OutputEvent("stderr", payload["data"])
        if kind == "exit":
            return exit_event(payload)
        if kind == "error":
            raise problem_error(payload.get("status", 500), data.encode())
        return None
