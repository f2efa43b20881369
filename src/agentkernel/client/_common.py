"""What the sync and async clients share: results, events, errors, request bodies and SSE parsing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import httpx

from agentkernel.errors import AgentkernelError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_URL = "http://127.0.0.1:18888"
API_KEY_ENV = "AGENTKERNEL_API_KEY"
CHUNK = 256 * 1024
KEPT_OUTPUT = 8 << 20
"""Characters of each stream a result assembled from streamed output keeps (as the server's do)."""
T = TypeVar("T", bound="DataclassInstance")


class ClientError(AgentkernelError):
    """The base of the SDK's errors."""


class ClientConnectionError(ClientError, ConnectionError):
    """The server could not be reached, or the connection to it failed midway: refused, timed out,
    dropped (a stream of events that ends before the command's exit)."""


class ApiError(ClientError):
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
    status: Literal["created", "starting", "running", "paused", "stopped", "failed"]
    backend: str
    image: str
    image_digest: str
    vcpus: int
    memory_mb: int
    profile: str
    created_at: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    env: tuple[str, ...] = ()
    """The names of the variables set for every command in the sandbox."""
    lifetime_s: float | None = None
    """Seconds it runs after each start before it is stopped (None: until stopped)."""
    lifetime_left_s: float | None = None
    """Seconds until a running (or paused) sandbox is stopped, when it was last seen."""


@dataclass(frozen=True)
class SnapshotInfo:
    """A saved sandbox (memory, processes, disk) that new sandboxes are forked from."""

    name: str
    source: str
    created_at: str
    image: str
    disk_bytes: int


@dataclass(frozen=True)
class FileEntry:
    """A file or directory. `name` is its name in a listing (its path below the listed directory
    when listed with a depth), its full path from `stat`; `mode` is the permission bits as an octal
    string, "0644", as everywhere in agentkernel."""

    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str
    mtime_ns: int


@dataclass(frozen=True)
class FileEvent:
    """A change under a watched directory: `name` relative to it, `kind` "file" or "dir", `event`
    one of create, write, remove, moved_from, moved_to, chmod, or overflow (changes were dropped:
    list the directory again)."""

    name: str
    kind: str
    event: str


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class OutputEvent:
    """A chunk of a command's output as it arrived, decoded as UTF-8: not a line (a line may come in
    several chunks, and a chunk may hold several lines)."""

    stream: Literal["stdout", "stderr"]
    data: str


@dataclass(frozen=True)
class ExitEvent:
    exit_code: int | None
    signal: int | None
    timed_out: bool


Event = Started | OutputEvent | ExitEvent


@contextlib.contextmanager
def transport_errors(base_url: str) -> Iterator[None]:
    """httpx's transport failures as ClientConnectionError."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ClientConnectionError(f"{base_url}: timed out ({_reason(exc)})") from exc
    except httpx.ConnectError as exc:
        raise ClientConnectionError(f"cannot connect to {base_url}: {_reason(exc)}") from exc
    except httpx.TransportError as exc:
        raise ClientConnectionError(f"the connection to {base_url} failed: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


OutputCallback = Callable[[str], object]
"""Called with each chunk of output as it arrives (an async client also awaits what it returns)."""


class Assembled:
    """A RunResult from the events of a stream (its output kept up to KEPT_OUTPUT characters)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.kept = {"stdout": 0, "stderr": 0}
        self.cut = {"stdout": False, "stderr": False}
        self.exit: ExitEvent | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, ExitEvent):
            self.exit = event
        elif isinstance(event, OutputEvent):
            room = KEPT_OUTPUT - self.kept[event.stream]
            self.out[event.stream].append(event.data[: max(0, room)])
            self.kept[event.stream] += min(len(event.data), max(0, room))
            self.cut[event.stream] |= len(event.data) > room

    def result(self) -> RunResult:
        assert self.exit is not None
        return RunResult(
            exit_code=self.exit.exit_code,
            signal=self.exit.signal,
            timed_out=self.exit.timed_out,
            stdout="".join(self.out["stdout"]),
            stderr="".join(self.out["stderr"]),
            stdout_truncated=self.cut["stdout"],
            stderr_truncated=self.cut["stderr"],
            duration_ms=round((time.monotonic() - self.started) * 1000),
        )


def dropped(base_url: str) -> ClientConnectionError:
    return ClientConnectionError(f"the connection to {base_url} ended before the command exited")


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


def file_path(name: str, path: str, route: str = "files") -> str:
    """The URL path of a guest file under `route` (files, stat, exists, mkdir, rename, watch). `..`
    is refused here: URL normalization would resolve it."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r}: paths in a sandbox are absolute")
    if ".." in path.split("/"):
        raise ValueError(f"{path!r}: '..' segments are not allowed")
    return f"/sandboxes/{quote(name, safe='')}/{route}/{quote(path.lstrip('/'), safe='/')}"


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


def snapshot_info(data: dict[str, Any]) -> SnapshotInfo:
    return _known(SnapshotInfo, data)


def snapshot_path(name: str, action: str = "") -> str:
    return f"/snapshots/{quote(name, safe='')}{action}"


def fork_body(name: str | None, timeout: float | None) -> dict[str, Any]:
    """The body of POST /snapshots/{name}/fork."""
    return {k: v for k, v in {"name": name, "timeout": timeout}.items() if v is not None}


def sandbox_info(data: dict[str, Any]) -> SandboxInfo:
    info = _known(SandboxInfo, data)
    return dataclasses.replace(info, labels=dict(info.labels), env=tuple(info.env))


def create_body(
    name: str | None,
    *,
    image: str | None,
    profile: str | None,
    vcpus: int | None,
    memory_mb: int | None,
    start: bool,
    secrets: Sequence[str] | None,
    env: Mapping[str, str] | None,
    labels: Mapping[str, str] | None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The body of POST /sandboxes (what is not given is left to the server's agentkernel.toml, and
    a lifetime to the server's default)."""
    body: dict[str, Any] = {"name": name, "image": image, "profile": profile, "vcpus": vcpus}
    body = {k: v for k, v in {**body, "memory_mb": memory_mb, "timeout": timeout}.items() if v is not None}
    if secrets:  # names of secrets the server holds (docs/secrets.md); values never leave it
        body["secrets"] = list(secrets)
    if env:
        body["env"] = dict(env)
    if labels:
        body["labels"] = dict(labels)
    return {**body, "start": start}


def label_filter(labels: Mapping[str, str] | None) -> dict[str, list[str]]:
    """The query of GET /sandboxes that keeps the sandboxes with all of `labels`."""
    return {"label": [f"{key}={value}" for key, value in labels.items()]} if labels else {}


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
