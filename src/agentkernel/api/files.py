"""Files in a sandbox: GET (a file's bytes, or a directory's listing), PUT and DELETE, streamed.

The path in the URL is the absolute path in the guest without its leading slash. The guest resolves
it (symlinks and all); the host only refuses `..`, NUL and overlong paths, and never touches its own
filesystem for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import posixpath
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from agentkernel.api.models import DirListing, FileEntry, Written
from agentkernel.api.problems import from_exception
from agentkernel.api.routes import BODY, Name, Service, problems
from agentkernel.api.sse import KEEPALIVE, ClosingStreamingResponse, event
from agentkernel.errors import AgentkernelError
from agentkernel.protocol.connection import FileEvent, Watch
from agentkernel.service.checks import guest_path
from agentkernel.service.files import MAX_DEPTH, MODE_DESCRIPTION, MODE_PATTERN, parse_mode

FILE_PATH = "/sandboxes/{name}/files/{path:path}"
WATCH_EVENTS = (
    "Server-Sent Events: `change` {name, kind, event} for each change (`name` relative to the "
    "directory; `event` one of create, write, remove, moved_from, moved_to, chmod, overflow), "
    "`end` once the directory itself is gone (removed or moved away), `error` (a problem) if the "
    "watch fails."
)
QUEUED_EVENTS = 64  # events waiting for a slow client; beyond it they wait in the guest (bounded there)


class Exists(BaseModel):
    path: str
    exists: bool


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(description="The new absolute path; a file there is replaced.", examples=["/tmp/new"])


router = APIRouter(tags=["files"], responses=problems(401, 404, 409, 413, 422, 502))


@router.get(
    FILE_PATH,
    response_model=DirListing,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}},
)
async def read(
    name: Name,
    path: str,
    sandboxes: Service,
    depth: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_DEPTH,
            description="For a directory: levels to list (1: its own entries; more: names are paths "
            "below it, parents first; symlinks are not followed).",
        ),
    ] = 1,
) -> Response:
    """A regular file's bytes (streamed), or, for a directory, its entries as JSON."""
    full = guest_path("/" + path)
    info = await sandboxes.stat(name, full)
    if info.kind == "dir":
        entries = [FileEntry.of(e) for e in await sandboxes.list_dir(name, full, depth=depth)]
        return Response(
            DirListing(path=full, entries=entries).model_dump_json(), media_type="application/json"
        )
    info, chunks = await sandboxes.open_file(name, full)
    headers = {"X-Agentkernel-Mode": f"{info.mode:04o}", "X-Agentkernel-Mtime-Ns": str(info.mtime_ns)}
    return ClosingStreamingResponse(b"", chunks, media_type="application/octet-stream", headers=headers)


@router.put(
    FILE_PATH,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The file's bytes, streamed.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def write(
    name: Name,
    path: str,
    request: Request,
    sandboxes: Service,
    mode: Annotated[str, Query(pattern=MODE_PATTERN, description=MODE_DESCRIPTION)] = "0644",
    parents: Annotated[bool, Query(description="Create missing parent directories.")] = False,
) -> Written:
    """Write the request body to the file, which appears whole or not at all."""
    full = guest_path("/" + path)
    if parents:
        await sandboxes.mkdir(name, posixpath.dirname(full), parents=True)
    size = await sandboxes.write_file(name, full, request.stream(), mode=parse_mode(mode))
    return Written(path=full, size=size)


@router.delete(FILE_PATH, status_code=204)
async def remove(
    name: Name,
    path: str,
    sandboxes: Service,
    recursive: Annotated[bool, Query(description="Remove a directory and all it holds.")] = False,
) -> Response:
    await sandboxes.remove_path(name, "/" + path, recursive=recursive)
    return Response(status_code=204)


@router.get("/sandboxes/{name}/stat/{path:path}")
async def stat(name: Name, path: str, sandboxes: Service) -> FileEntry:
    """What is at the path (a final symlink followed); 404 file_not_found when nothing is."""
    full = guest_path("/" + path)
    info = await sandboxes.stat(name, full)
    return FileEntry.of(dataclasses.replace(info, name=full))


@router.get("/sandboxes/{name}/exists/{path:path}")
async def exists(name: Name, path: str, sandboxes: Service) -> Exists:
    full = guest_path("/" + path)
    return Exists(path=full, exists=await sandboxes.exists(name, full))


@router.post("/sandboxes/{name}/mkdir/{path:path}", status_code=201)
async def mkdir(
    name: Name,
    path: str,
    sandboxes: Service,
    mode: Annotated[str, Query(pattern=MODE_PATTERN, description=MODE_DESCRIPTION)] = "0755",
    parents: Annotated[
        bool, Query(description="Create missing parents too; an existing directory is then no error.")
    ] = True,
) -> FileEntry:
    """Make a directory; returns what is there afterwards."""
    full = guest_path("/" + path)
    await sandboxes.mkdir(name, full, parents=parents, mode=parse_mode(mode))
    return FileEntry.of(dataclasses.replace(await sandboxes.stat(name, full), name=full))


@router.post("/sandboxes/{name}/rename/{path:path}", responses=BODY)
async def rename(name: Name, path: str, body: RenameRequest, sandboxes: Service) -> FileEntry:
    """Move a file or directory within the sandbox (rename(2): one filesystem); returns the moved entry."""
    info = await sandboxes.rename(name, "/" + path, body.to)
    return FileEntry.of(dataclasses.replace(info, name=guest_path(body.to, field="to")))


@router.get(
    "/sandboxes/{name}/watch/{path:path}",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}, "description": WATCH_EVENTS}},
)
async def watch(
    name: Name,
    path: str,
    sandboxes: Service,
    recursive: Annotated[bool, Query(description="Follow the directories below it too.")] = False,
) -> Response:
    """Follow changes under a directory as Server-Sent Events, until the client leaves or the
    directory is gone. The watch is active once the response starts."""
    watcher = await sandboxes.watch(name, "/" + path, recursive=recursive)
    return ClosingStreamingResponse(
        b"", _watch_events(watcher), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def _watch_events(watcher: Watch) -> AsyncGenerator[bytes, None]:
    """The SSE body: `change` per event, a comment every KEEPALIVE s of quiet (so a client that left
    is noticed and the guest stops watching), `end` when the directory is gone, `error` if it fails."""
    queue: asyncio.Queue[FileEvent | AgentkernelError | None] = asyncio.Queue(QUEUED_EVENTS)

    async def pump() -> None:
        try:
            async for change in watcher.events():
                await queue.put(change)
            await queue.put(None)
        except AgentkernelError as exc:
            await queue.put(exc)

    task = asyncio.create_task(pump())
    try:
        yield b": watching\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if isinstance(item, AgentkernelError):
                yield event("error", from_exception(item).model_dump(exclude_none=True))
                return
            if item is None or item.event == "gone":
                yield event("end", {})
                return
            yield event("change", dataclasses.asdict(item))
    finally:
        task.cancel()
        watcher.close()
