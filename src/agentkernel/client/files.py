"""`sandbox.files`: a sandbox's files, sync (`Files`) and async (`AsyncFiles`).

    box.files.write("/work/a.txt", b"hi")
    box.files.list("/work", depth=2)
    with box.files.watch("/work") as changes:
        for change in changes: ...

Modes are octal strings ("0644") in and out, as on every face of agentkernel.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

import httpx

from agentkernel.client._common import (
    ApiError,
    ClientConnectionError,
    FileEntry,
    FileEvent,
    _known,
    file_entries,
    file_path,
    problem_error,
    transport_errors,
)

if TYPE_CHECKING:
    from agentkernel.client.aio import AsyncSandbox
    from agentkernel.client.sync import Sandbox

WATCH_TIMEOUT = httpx.Timeout(30.0, read=None)
"""A watch may be quiet for long (the server sends a comment every 15 s): no read timeout."""


class _WatchParser:
    """The watch stream's Server-Sent Events: a FileEvent per `change`, None at `end`."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        self._kind = "message"
        self._data: list[str] = []

    def line(self, line: str) -> FileEvent | bool | None:
        """A FileEvent; True when the watch is over; False when there is nothing yet."""
        if line:
            field, _, value = line.partition(":")
            if field == "event":
                self._kind = value.strip()
            elif field == "data":
                self._data.append(value.removeprefix(" "))
            return False
        kind, data = self._kind, "\n".join(self._data)
        self._kind, self._data = "message", []
        if kind == "change" and data:
            return _known(FileEvent, json.loads(data))
        if kind == "end":
            return True
        if kind == "error" and data:
            raise problem_error(json.loads(data).get("status", 500), data.encode())
        return False


def _ended(base_url: str) -> ClientConnectionError:
    return ClientConnectionError(f"the connection to {base_url} ended while watching")


class FileWatch:
    """Changes under a directory, watched from when `Files.watch` returned: iterate for FileEvents
    (the iteration ends when the directory itself is removed); `close` stops watching."""

    def __init__(self, response: httpx.Response, base_url: str) -> None:
        self._response = response
        self._base_url = base_url

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[FileEvent]:
        parser = _WatchParser(self._base_url)
        with transport_errors(self._base_url):
            for line in self._response.iter_lines():
                event = parser.line(line)
                if event is True:
                    self.close()
                    return
                if isinstance(event, FileEvent):
                    yield event
        if not self._response.is_closed:
            raise _ended(self._base_url)

    def close(self) -> None:
        self._response.close()


class AsyncFileWatch:
    """`FileWatch` for asyncio: `async for` the FileEvents; `aclose` (or `async with`) stops it."""

    def __init__(self, response: httpx.Response, base_url: str) -> None:
        self._response = response
        self._base_url = base_url

    async def __aenter__(self) -> AsyncFileWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __aiter__(self) -> AsyncIterator[FileEvent]:
        parser = _WatchParser(self._base_url)
        with transport_errors(self._base_url):
            async for line in self._response.aiter_lines():
                event = parser.line(line)
                if event is True:
                    await self.aclose()
                    return
                if isinstance(event, FileEvent):
                    yield event
        if not self._response.is_closed:
            raise _ended(self._base_url)

    async def aclose(self) -> None:
        await self._response.aclose()


def _stat_entry(data: dict[str, Any]) -> FileEntry:
    return _known(FileEntry, data)


class Files:
    """The files of a sandbox (`Sandbox.files`)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._box = sandbox

    def _call(self, method: str, route: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._box._client._request(method, file_path(self._box.name, path, route), **kwargs)

    def read(self, path: str) -> bytes:
        return self._box.read_file(path)

    def iter(self, path: str) -> Iterator[bytes]:
        """A file's bytes as they arrive."""
        return self._box.iter_file(path)

    def write(
        self,
        path: str,
        data: bytes | Iterable[bytes] | IO[bytes],
        *,
        mode: str = "0644",
        parents: bool = False,
    ) -> int:
        """Write a file whole (it appears complete or not at all); returns its size."""
        return self._box.write_file(path, data, mode=mode, parents=parents)

    def stat(self, path: str) -> FileEntry:
        """What is at `path` (a final symlink followed); ApiError 404 file_not_found if nothing."""
        return _stat_entry(self._call("GET", "stat", path).json())

    def exists(self, path: str) -> bool:
        exists: bool = self._call("GET", "exists", path).json()["exists"]
        return exists

    def list(self, path: str = "/", *, depth: int = 1) -> list[FileEntry]:
        """A directory's entries; with `depth` > 1 those below it too, named by their path below
        `path`, parents first (symlinks are not followed)."""
        response = self._call("GET", "files", path, params={"depth": depth})
        if not response.headers.get("content-type", "").startswith("application/json"):
            raise ApiError(409, "not_a_directory", f"{path} is not a directory", "path")
        return file_entries(response.json())

    def mkdir(self, path: str, *, parents: bool = True, mode: str = "0755") -> FileEntry:
        params = {"parents": "true" if parents else "false", "mode": mode}
        return _stat_entry(self._call("POST", "mkdir", path, params=params).json())

    def rename(self, path: str, to: str) -> FileEntry:
        """Move `path` to `to` (replacing a file there); returns the moved entry."""
        return _stat_entry(self._call("POST", "rename", path, json={"to": to}).json())

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._box.remove_file(path, recursive=recursive)

    def watch(self, path: str, *, recursive: bool = False) -> FileWatch:
        """Watch directory `path` for changes (with `recursive`, the directories below too): changes
        from when this returns are seen. Use as a context manager, or `close` it."""
        client = self._box._client
        url = file_path(self._box.name, path, "watch")
        params = {"recursive": "true"} if recursive else {}
        request = client._http.build_request("GET", url, params=params, timeout=WATCH_TIMEOUT)
        with transport_errors(client.base_url):
            response = client._http.send(request, stream=True)
        if response.is_error:
            body = response.read()
            response.close()
            raise problem_error(response.status_code, body)
        return FileWatch(response, client.base_url)


class AsyncFiles:
    """The files of a sandbox (`AsyncSandbox.files`)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._box = sandbox

    async def _call(self, method: str, route: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._box._client._request(method, file_path(self._box.name, path, route), **kwargs)

    async def read(self, path: str) -> bytes:
        return await self._box.read_file(path)

    def iter(self, path: str) -> AsyncIterator[bytes]:
        """A file's bytes as they arrive."""
        return self._box.iter_file(path)

    async def write(
        self,
        path: str,
        data: bytes | Iterable[bytes] | AsyncIterable[bytes],
        *,
        mode: str = "0644",
        parents: bool = False,
    ) -> int:
        """Write a file whole (it appears complete or not at all); returns its size."""
        return await self._box.write_file(path, data, mode=mode, parents=parents)

    async def stat(self, path: str) -> FileEntry:
        """What is at `path` (a final symlink followed); ApiError 404 file_not_found if nothing."""
        return _stat_entry((await self._call("GET", "stat", path)).json())

    async def exists(self, path: str) -> bool:
        exists: bool = (await self._call("GET", "exists", path)).json()["exists"]
        return exists

    async def list(self, path: str = "/", *, depth: int = 1) -> list[FileEntry]:
        """A directory's entries; with `depth` > 1 those below it too, named by their path below
        `path`, parents first (symlinks are not followed)."""
        response = await self._call("GET", "files", path, params={"depth": depth})
        if not response.headers.get("content-type", "").startswith("application/json"):
            raise ApiError(409, "not_a_directory", f"{path} is not a directory", "path")
        return file_entries(response.json())

    async def mkdir(self, path: str, *, parents: bool = True, mode: str = "0755") -> FileEntry:
        params = {"parents": "true" if parents else "false", "mode": mode}
        return _stat_entry((await self._call("POST", "mkdir", path, params=params)).json())

    async def rename(self, path: str, to: str) -> FileEntry:
        """Move `path` to `to` (replacing a file there); returns the moved entry."""
        return _stat_entry((await self._call("POST", "rename", path, json={"to": to})).json())

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._box.remove_file(path, recursive=recursive)

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncFileWatch:
        """Watch directory `path` for changes (with `recursive`, the directories below too): changes
        from when this returns are seen. `async with` it, or `aclose` it."""
        client = self._box._client
        url = file_path(self._box.name, path, "watch")
        params = {"recursive": "true"} if recursive else {}
        request = client._http.build_request("GET", url, params=params, timeout=WATCH_TIMEOUT)
        with transport_errors(client.base_url):
            response = await client._http.send(request, stream=True)
        if response.is_error:
            body = await response.aread()
            await response.aclose()
            raise problem_error(response.status_code, body)
        return AsyncFileWatch(response, client.base_url)
