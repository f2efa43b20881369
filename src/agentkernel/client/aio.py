"""The asyncio client: `AsyncClient`, `AsyncSandbox` and `AsyncTerminal` (an attached PTY)."""

from __future__ import annotations

import inspect
import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Literal, TypeVar, overload

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus, InvalidURI

from agentkernel.client._common import (
    CHUNK,
    DEFAULT_URL,
    ApiError,
    Assembled,
    ClientConnectionError,
    Event,
    ExitEvent,
    FileEntry,
    OutputCallback,
    OutputEvent,
    RunResult,
    SandboxInfo,
    SnapshotInfo,
    SSEParser,
    attach_url,
    command_body,
    create_body,
    dropped,
    file_entries,
    file_path,
    fork_body,
    headers,
    label_filter,
    problem_error,
    resolve_api_key,
    run_result,
    sandbox_info,
    sandbox_path,
    snapshot_info,
    snapshot_path,
    terminal_control,
    transport_errors,
)
from agentkernel.client.commands import (
    AsyncCommandHandle,
    CommandInfo,
    command_info,
    commands_path,
    start_body,
)
from agentkernel.client.files import AsyncFiles
from agentkernel.client.ports import host_address, port_body

H = TypeVar("H", bound=AbstractAsyncContextManager[Any])


class Opening(Generic[H]):
    """A handle being opened: await it for the handle, or use it in `async with` directly (the
    handle's own `async with` then applies: an owned sandbox is removed on exit, a terminal closed)."""

    def __init__(self, opening: Coroutine[Any, Any, H]) -> None:
        self._opening = opening
        self._handle: H | None = None

    def __await__(self) -> Generator[Any, None, H]:
        return self._opening.__await__()

    async def __aenter__(self) -> H:
        self._handle = await self._opening
        await self._handle.__aenter__()
        return self._handle

    async def __aexit__(self, *exc: Any) -> None:
        assert self._handle is not None
        await self._handle.__aexit__(*exc)


class AsyncClient:
    """A connection to `agentkernel serve`. The API key defaults to $AGENTKERNEL_API_KEY.

    `timeout` bounds each HTTP request (a long command needs a longer one, or streaming). A server
    that cannot be reached, or a connection that fails midway, raises ClientConnectionError; a
    request the server refuses raises ApiError (both are ClientError).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = resolve_api_key(api_key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers(self._key), timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with transport_errors(self.base_url):
            response = await self._http.request(method, path, **kwargs)
        if response.is_error:
            raise problem_error(response.status_code, response.content)
        return response

    async def _events(
        self,
        path: str,
        body: dict[str, Any],
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncGenerator[Event, None]:
        with transport_errors(self.base_url):
            async with self._http.stream("POST", path, json=body) as response:
                if response.is_error:
                    raise problem_error(response.status_code, await response.aread())
                parser = SSEParser()
                async for line in response.aiter_lines():
                    if (event := parser.line(line)) is None:
                        continue
                    if isinstance(event, OutputEvent):
                        callback = on_stdout if event.stream == "stdout" else on_stderr
                        if callback is not None and inspect.isawaitable(called := callback(event.data)):
                            await called
                    yield event
                    if isinstance(event, ExitEvent):
                        return
        raise dropped(self.base_url)

    async def _streamed(
        self,
        path: str,
        body: dict[str, Any],
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> RunResult:
        assembled = Assembled()
        async for event in self._events(path, body, on_stdout, on_stderr):
            assembled.add(event)
        return assembled.result()

    async def health(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self._request("GET", "/health")).json()
        return data

    async def run(
        self,
        command: Sequence[str],
        *,
        image: str | None = None,
        profile: str | None = None,
        secrets: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> RunResult:
        """Run a command in a new sandbox (removed afterwards) and wait for it to exit. Cancelling the call
        closes its connection: the server then ends the command and removes the sandbox.

        `on_stdout` / `on_stderr` (plain functions or coroutine functions) are called with each chunk
        of output as it arrives (the command is then streamed); the result holds the output as well."""
        body = command_body(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, image=image, profile=profile
        )
        if secrets:  # names of secrets the server holds (docs/secrets.md); values never leave it
            body["secrets"] = list(secrets)
        if on_stdout is not None or on_stderr is not None:
            return await self._streamed("/run/stream", body, on_stdout, on_stderr)
        return run_result((await self._request("POST", "/run", json=body)).json())

    def run_stream(
        self,
        command: Sequence[str],
        *,
        image: str | None = None,
        profile: str | None = None,
        secrets: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Like `run`, yielding events as the command produces output: Started, OutputEvent for each
        chunk as it arrives (not each line), then ExitEvent. The callbacks are called (and awaited,
        if coroutine functions) with each chunk before its event is yielded. Closing the iterator
        early (`aclose`) ends the command."""
        body = command_body(
            command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, image=image, profile=profile
        )
        if secrets:  # names of secrets the server holds (docs/secrets.md); values never leave it
            body["secrets"] = list(secrets)
        return self._events("/run/stream", body, on_stdout, on_stderr)

    async def list_sandboxes(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        """Every sandbox; with `labels`, those that have all of them."""
        found = (await self._request("GET", "/sandboxes", params=label_filter(labels))).json()
        return [sandbox_info(s) for s in found]

    def create_sandbox(
        self,
        name: str | None = None,
        *,
        image: str | None = None,
        profile: str | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        start: bool = True,
        secrets: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Opening[AsyncSandbox]:
        """A new sandbox (booted unless `start` is False): `await` it, or `async with` it directly to
        have it removed on exit. `env` is set for every command in it (a command's own wins);
        `labels` find it in a list; `timeout` is its lifetime in seconds (default: the server's; 0:
        none, it runs until stopped), see `AsyncSandbox.set_timeout`."""
        body = create_body(
            name, image=image, profile=profile, vcpus=vcpus, memory_mb=memory_mb, start=start,
            secrets=secrets, env=env, labels=labels, timeout=timeout,
        )  # fmt: skip
        return Opening(self._create_sandbox(body))

    async def _create_sandbox(self, body: dict[str, Any]) -> AsyncSandbox:
        response = await self._request("POST", "/sandboxes", json=body)
        return AsyncSandbox(self, sandbox_info(response.json()), owned=True)

    def sandbox(self, name: str) -> Opening[AsyncSandbox]:
        """A handle to an existing sandbox (`await` it, or `async with` it); leaving it as a context
        manager does not remove it."""
        return Opening(self._sandbox(name))

    async def _sandbox(self, name: str) -> AsyncSandbox:
        response = await self._request("GET", sandbox_path(name))
        return AsyncSandbox(self, sandbox_info(response.json()), owned=False)

    async def list_snapshots(self) -> list[SnapshotInfo]:
        return [snapshot_info(s) for s in (await self._request("GET", "/snapshots")).json()]

    def fork(
        self, snapshot: str, name: str | None = None, *, timeout: float | None = None
    ) -> Opening[AsyncSandbox]:
        """A new running sandbox resumed from `snapshot` (see `AsyncSandbox.snapshot`): `await` it,
        or `async with` it to have it removed on exit. `timeout`: as for `create_sandbox`."""
        return Opening(self._fork(snapshot, fork_body(name, timeout)))

    async def _fork(self, snapshot: str, body: dict[str, Any]) -> AsyncSandbox:
        response = await self._request("POST", snapshot_path(snapshot, "/fork"), json=body)
        return AsyncSandbox(self, sandbox_info(response.json()), owned=True)

    async def remove_snapshot(self, snapshot: str) -> None:
        await self._request("DELETE", snapshot_path(snapshot))


class AsyncSandbox:
    """A sandbox on the server. `info` is its state as last seen (see `refresh`)."""

    def __init__(self, client: AsyncClient, info: SandboxInfo, *, owned: bool) -> None:
        self._client = client
        self.info = info
        self.name = info.name
        self._owned = owned
        self.files = AsyncFiles(self)
        """Its files: stat, exists, list, mkdir, rename, remove, read, write, watch."""

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owned:
            await self.remove(force=True)

    async def _info(self, method: str, action: str = "") -> SandboxInfo:
        self.info = sandbox_info(
            (await self._client._request(method, sandbox_path(self.name, action))).json()
        )
        return self.info

    async def refresh(self) -> SandboxInfo:
        return await self._info("GET")

    async def start(self) -> SandboxInfo:
        return await self._info("POST", "/start")

    async def stop(self) -> SandboxInfo:
        return await self._info("POST", "/stop")

    async def set_timeout(self, timeout: float) -> SandboxInfo:
        """Stop the sandbox `timeout` seconds from now, earlier or later than before (0: run until
        stopped); for this run only: a later start gets its lifetime again."""
        path = sandbox_path(self.name, "/timeout")
        response = await self._client._request("POST", path, json={"timeout": timeout})
        self.info = sandbox_info(response.json())
        return self.info

    async def get_host(self, port: int, *, bind: str | None = None, host_port: int | None = None) -> str:
        """Where to reach guest port `port` (a server on the sandbox's loopback) from outside:
        `host:port`, forwarded on first use (asking again gives the same address). The server
        listens on 127.0.0.1 unless `bind` names another address (0.0.0.0: every one; the
        sandbox's profile must allow it). For a listener on every address `host` is the API
        server's host name as this client reaches it; a loopback one is reachable only on the API
        server's machine. ApiError 403 (ports_not_allowed) under a profile that forwards no ports."""
        path = sandbox_path(self.name, "/ports")
        response = await self._client._request("POST", path, json=port_body(port, bind, host_port))
        return host_address(response.json())

    async def pause(self) -> SandboxInfo:
        """Freeze the sandbox, its memory kept: its processes stop where they are, and commands and
        file operations are refused (ApiError 409) until `resume`."""
        return await self._info("POST", "/pause")

    async def resume(self) -> SandboxInfo:
        """Let a paused sandbox's processes run on where they were."""
        return await self._info("POST", "/resume")

    async def snapshot(self, name: str) -> SnapshotInfo:
        """Save the running sandbox (memory, processes, disk) as snapshot `name`; it runs on."""
        path = sandbox_path(self.name, "/snapshots")
        return snapshot_info((await self._client._request("POST", path, json={"name": name})).json())

    async def remove(self, *, force: bool = False) -> None:
        params = {"force": "true"} if force else {}
        await self._client._request("DELETE", sandbox_path(self.name), params=params)

    async def exec(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> RunResult:
        """Run a command and wait for it to exit. `on_stdout` / `on_stderr` (plain functions or
        coroutine functions) are called with each chunk of output as it arrives (the command is then
        streamed); the result holds the output as well."""
        body = command_body(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin)
        if on_stdout is not None or on_stderr is not None:
            path = sandbox_path(self.name, "/exec/stream")
            return await self._client._streamed(path, body, on_stdout, on_stderr)
        response = await self._client._request("POST", sandbox_path(self.name, "/exec"), json=body)
        return run_result(response.json())

    def exec_stream(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Run a command, yielding events as it produces output: Started, OutputEvent for each chunk
        as it arrives (not each line), then ExitEvent. The callbacks are called (and awaited, if
        coroutine functions) with each chunk before its event is yielded. Closing the iterator
        (`aclose`) ends the command."""
        body = command_body(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin)
        return self._client._events(sandbox_path(self.name, "/exec/stream"), body, on_stdout, on_stderr)

    # -- background commands (commands.py) --------------------------------------------------

    @overload
    async def run(
        self,
        command: Sequence[str],
        *,
        background: Literal[False] = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> RunResult: ...

    @overload
    async def run(
        self,
        command: Sequence[str],
        *,
        background: Literal[True],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        command: Sequence[str],
        *,
        background: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> RunResult | AsyncCommandHandle:
        """Run a command: as `exec` (waits for its exit), or with `background` started detached, a
        AsyncCommandHandle at once. A background command runs on when this client is gone, until it exits, its
        `timeout` is up or the sandbox stops; its stdout and stderr are one stream, which `on_stdout`
        (or `on_stderr`, when only it is given) is called with while the handle's `wait()` reads it.
        `stdin`, for a background command, is written to it and its stdin then closed."""
        if not background:
            return await self.exec(
                command,
                env=env,
                cwd=cwd,
                timeout=timeout,
                stdin=stdin,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        body = start_body(command, env=env, cwd=cwd, timeout=timeout)
        started = (await self._client._request("POST", commands_path(self.name), json=body)).json()
        handle = AsyncCommandHandle(
            self._client, self.name, started["id"], started["pid"], on_stdout or on_stderr
        )
        if stdin is not None:
            await handle.send_stdin(stdin)
            await handle.close_stdin()
        return handle

    async def list_commands(self) -> list[CommandInfo]:
        """Its background commands, oldest first (ended ones too, until newer ones push them out)."""
        return [
            command_info(c) for c in (await self._client._request("GET", commands_path(self.name))).json()
        ]

    async def connect_command(
        self, command_id: int, *, on_stdout: OutputCallback | None = None
    ) -> AsyncCommandHandle:
        """A handle to background command `command_id` (from `run` or `list_commands`), say after a
        restart of this program; its output is read from the start."""
        info = command_info((await self._client._request("GET", commands_path(self.name, command_id))).json())
        return AsyncCommandHandle(self._client, self.name, info.id, info.pid, on_stdout)

    async def read_file(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.iter_file(path)])

    async def iter_file(self, path: str) -> AsyncIterator[bytes]:
        """A file's bytes as they arrive."""
        with transport_errors(self._client.base_url):
            async with self._client._http.stream("GET", file_path(self.name, path)) as response:
                if response.is_error:
                    raise problem_error(response.status_code, await response.aread())
                if response.headers.get("content-type", "").startswith("application/json"):
                    raise ApiError(409, "is_a_directory", f"{path} is a directory: use list_files", "path")
                async for chunk in response.aiter_bytes(CHUNK):
                    yield chunk

    async def write_file(
        self,
        path: str,
        data: bytes | Iterable[bytes] | AsyncIterable[bytes],
        *,
        mode: str = "0644",
        parents: bool = False,
    ) -> int:
        """Write a file (bytes, or chunks from a sync or async iterable); returns its size. `mode` is
        octal permission bits, "0644"."""
        params = {"mode": mode, "parents": "true" if parents else "false"}
        content = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else data
        response = await self._client._request(
            "PUT", file_path(self.name, path), content=content, params=params
        )
        size: int = response.json()["size"]
        return size

    async def list_files(self, path: str = "/") -> list[FileEntry]:
        response = await self._client._request("GET", file_path(self.name, path))
        if not response.headers.get("content-type", "").startswith("application/json"):
            raise ApiError(409, "not_a_directory", f"{path} is not a directory", "path")
        return file_entries(response.json())

    async def remove_file(self, path: str, *, recursive: bool = False) -> None:
        params = {"recursive": "true"} if recursive else {}
        await self._client._request("DELETE", file_path(self.name, path), params=params)

    def attach(
        self, command: Sequence[str] | None = None, *, rows: int = 24, cols: int = 80
    ) -> Opening[AsyncTerminal]:
        """A program (default: a login shell) on a terminal in the sandbox, over a WebSocket: `await`
        it, or `async with` it directly to have the connection closed on exit."""
        return Opening(self._attach(command, rows, cols))

    async def _attach(self, command: Sequence[str] | None, rows: int, cols: int) -> AsyncTerminal:
        url = attach_url(self._client.base_url, self.name, command, rows, cols)
        try:
            ws = await connect(url, additional_headers=headers(self._client._key), max_size=None)
        except InvalidStatus as exc:
            raise problem_error(exc.response.status_code, bytes(exc.response.body or b"")) from None
        except (OSError, TimeoutError, InvalidURI) as exc:
            raise ClientConnectionError(f"cannot attach to {self.name} at {url}: {exc}") from exc
        return AsyncTerminal(ws)


class AsyncTerminal:
    """An attached program: iterate for its output; `exit` is set once it has exited."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.exit: ExitEvent | None = None

    async def __aenter__(self) -> AsyncTerminal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, data: bytes | str) -> None:
        await self._ws.send(data.encode() if isinstance(data, str) else data, text=False)

    async def resize(self, rows: int, cols: int) -> None:
        await self._ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def signal(self, signo: int) -> None:
        await self._ws.send(json.dumps({"type": "signal", "signal": signo}))

    async def eof(self) -> None:
        await self._ws.send(json.dumps({"type": "eof"}))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Output until the program exits (then `exit` is set) or the server closes the connection;
        a connection that breaks raises ClientConnectionError."""
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    yield message
                    continue
                self.exit = terminal_control(message)
                return
        except ConnectionClosedOK:
            return
        except ConnectionClosedError as exc:
            raise ClientConnectionError(f"the terminal's connection broke: {exc}") from exc

    async def wait(self) -> ExitEvent | None:
        """Discard output until the program exits."""
        async for _ in self:
            pass
        return self.exit

    async def close(self) -> None:
        await self._ws.close()
