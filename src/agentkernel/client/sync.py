"""The blocking client: `Client`, `Sandbox` and `Terminal` (an attached PTY)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from agentkernel.client._common import (
    CHUNK,
    DEFAULT_URL,
    ApiError,
    Event,
    ExitEvent,
    FileEntry,
    RunResult,
    SandboxInfo,
    SSEParser,
    attach_url,
    command_body,
    file_entries,
    file_path,
    headers,
    problem_error,
    resolve_api_key,
    run_result,
    sandbox_info,
    sandbox_path,
    terminal_control,
)


class Client:
    """A connection to `agentkernel serve`. The API key defaults to $AGENTKERNEL_API_KEY.

    `timeout` bounds each HTTP request (a long command needs a longer one, or streaming).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = resolve_api_key(api_key)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers(self._key), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise problem_error(response.status_code, response.content)
        return response

    def _events(self, path: str, body: dict[str, Any]) -> Generator[Event, None, None]:
        with self._http.stream("POST", path, json=body) as response:
            if response.is_error:
                raise problem_error(response.status_code, response.read())
            parser = SSEParser()
            for line in response.iter_lines():
                if (event := parser.line(line)) is not None:
                    yield event

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", "/health").json()
        return data

    def run(
        self,
        command: Sequence[str],
        *,
        image: str | None = None,
        profile: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> RunResult:
        """Run a command in a new sandbox (removed afterwards) and wait for it to exit."""
        body = command_body(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, image=image, profile=profile
        )
        return run_result(self._request("POST", "/run", json=body).json())

    def run_stream(
        self,
        command: Sequence[str],
        *,
        image: str | None = None,
        profile: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> Generator[Event, None, None]:
        """Like `run`, yielding events as the command produces output. Closing the iterator early
        ends the command."""
        body = command_body(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, image=image, profile=profile
        )
        return self._events("/run/stream", body)

    def list_sandboxes(self) -> list[SandboxInfo]:
        return [sandbox_info(s) for s in self._request("GET", "/sandboxes").json()]

    def create_sandbox(
        self,
        name: str | None = None,
        *,
        image: str | None = None,
        profile: str | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        start: bool = True,
    ) -> Sandbox:
        """A new sandbox (booted unless `start` is False); as a context manager, removed on exit."""
        body = {"name": name, "image": image, "profile": profile, "vcpus": vcpus, "memory_mb": memory_mb}
        body = {k: v for k, v in body.items() if v is not None}
        info = sandbox_info(self._request("POST", "/sandboxes", json={**body, "start": start}).json())
        return Sandbox(self, info, owned=True)

    def sandbox(self, name: str) -> Sandbox:
        """A handle to an existing sandbox; leaving it as a context manager does not remove it."""
        return Sandbox(self, sandbox_info(self._request("GET", sandbox_path(name)).json()), owned=False)


class Sandbox:
    """A sandbox on the server. `info` is its state as last seen (see `refresh`)."""

    def __init__(self, client: Client, info: SandboxInfo, *, owned: bool) -> None:
        self._client = client
        self.info = info
        self.name = info.name
        self._owned = owned

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self.remove(force=True)

    def _info(self, method: str, action: str = "") -> SandboxInfo:
        self.info = sandbox_info(self._client._request(method, sandbox_path(self.name, action)).json())
        return self.info

    def refresh(self) -> SandboxInfo:
        return self._info("GET")

    def start(self) -> SandboxInfo:
        return self._info("POST", "/start")

    def stop(self) -> SandboxInfo:
        return self._info("POST", "/stop")

    def remove(self, *, force: bool = False) -> None:
        params = {"force": "true"} if force else {}
        self._client._request("DELETE", sandbox_path(self.name), params=params)

    def exec(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> RunResult:
        """Run a command and wait for it to exit."""
        body = command_body(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin)
        return run_result(self._client._request("POST", sandbox_path(self.name, "/exec"), json=body).json())

    def exec_stream(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> Generator[Event, None, None]:
        """Run a command, yielding events as it produces output. Closing the iterator ends it."""
        body = command_body(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin)
        return self._client._events(sandbox_path(self.name, "/exec/stream"), body)

    def read_file(self, path: str) -> bytes:
        return b"".join(self.iter_file(path))

    def iter_file(self, path: str) -> Iterator[bytes]:
        """A file's bytes as they arrive."""
        with self._client._http.stream("GET", file_path(self.name, path)) as response:
            if response.is_error:
                raise problem_error(response.status_code, response.read())
            if response.headers.get("content-type", "").startswith("application/json"):
                raise ApiError(409, "is_a_directory", f"{path} is a directory: use list_files", "path")
            yield from response.iter_bytes(CHUNK)

    def write_file(
        self,
        path: str,
        data: bytes | Iterable[bytes] | IO[bytes],
        *,
        mode: int = 0o644,
        parents: bool = False,
    ) -> int:
        """Write a file (bytes, an iterable of chunks, or a binary file object); returns its size."""
        content = _chunks(data)
        params = {"mode": f"{mode:o}", "parents": "true" if parents else "false"}
        response = self._client._request("PUT", file_path(self.name, path), content=content, params=params)
        size: int = response.json()["size"]
        return size

    def list_files(self, path: str = "/") -> list[FileEntry]:
        response = self._client._request("GET", file_path(self.name, path))
        if not response.headers.get("content-type", "").startswith("application/json"):
            raise ApiError(409, "not_a_directory", f"{path} is not a directory", "path")
        return file_entries(response.json())

    def remove_file(self, path: str, *, recursive: bool = False) -> None:
        params = {"recursive": "true"} if recursive else {}
        self._client._request("DELETE", file_path(self.name, path), params=params)

    def attach(self, command: Sequence[str] | None = None, *, rows: int = 24, cols: int = 80) -> Terminal:
        """A program (default: a login shell) on a terminal in the sandbox, over a WebSocket."""
        url = attach_url(self._client.base_url, self.name, command, rows, cols)
        stack = contextlib.ExitStack()
        try:
            ws = stack.enter_context(
                connect(url, additional_headers=headers(self._client._key), max_size=None)
            )
        except InvalidStatus as exc:
            raise problem_error(exc.response.status_code, bytes(exc.response.body or b"")) from None
        return Terminal(ws, stack)


def _chunks(data: bytes | Iterable[bytes] | IO[bytes]) -> bytes | Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(data, "read"):
        return iter(lambda: data.read(CHUNK), b"")
    return iter(data)


class Terminal:
    """An attached program: iterate for its output; `exit` is set once it has exited."""

    def __init__(self, ws: ClientConnection, closing: contextlib.ExitStack) -> None:
        self._ws = ws
        self._closing = closing
        self.exit: ExitEvent | None = None

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        self._ws.send(data.encode() if isinstance(data, str) else data, text=False)

    def resize(self, rows: int, cols: int) -> None:
        self._ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    def signal(self, signo: int) -> None:
        self._ws.send(json.dumps({"type": "signal", "signal": signo}))

    def eof(self) -> None:
        self._ws.send(json.dumps({"type": "eof"}))

    def __iter__(self) -> Iterator[bytes]:
        """Output until the program exits (then `exit` is set) or the connection closes."""
        try:
            for message in self._ws:
                if isinstance(message, bytes):
                    yield message
                    continue
                self.exit = terminal_control(message)
                return
        except ConnectionClosed:
            return

    def wait(self) -> ExitEvent | None:
        """Discard output until the program exits."""
        for _ in self:
            pass
        return self.exit

    def close(self) -> None:
        self._closing.close()
