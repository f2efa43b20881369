"""Files in a sandbox: GET (a file's bytes, or a directory's listing), PUT and DELETE, streamed.

The path in the URL is the absolute path in the guest without its leading slash. The guest resolves
it (symlinks and all); the host only refuses `..`, NUL and overlong paths, and never touches its own
filesystem for it.
"""

from __future__ import annotations

import posixpath
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from agentkernel.api.models import DirListing, FileEntry, Written
from agentkernel.api.routes import Name, Service, problems
from agentkernel.api.sse import ClosingStreamingResponse
from agentkernel.service.checks import guest_path

FILE_PATH = "/sandboxes/{name}/files/{path:path}"

router = APIRouter(tags=["files"], responses=problems(401, 404, 409, 413, 422, 502))


@router.get(
    FILE_PATH,
    response_model=DirListing,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}},
)
async def read(name: Name, path: str, sandboxes: Service) -> Response:
    """A regular file's bytes (streamed), or, for a directory, its entries as JSON."""
    full = guest_path("/" + path)
    info = await sandboxes.stat(name, full)
    if info.kind == "dir":
        entries = [FileEntry.of(e) for e in await sandboxes.list_dir(name, full)]
        return Response(
            DirListing(path=full, entries=entries).model_dump_json(), media_type="application/json"
        )
    info, chunks = await sandboxes.open_file(name, full)
    headers = {"X-Agentkernel-Mode": f"{info.mode:04o}", "X-Agentkernel-Mtime-Ns": str(info.mtime_ns)}
    return ClosingStreamingResponse(b"", chunks, media_type="application/octet-stream", headers=headers)


@router.put(FILE_PATH, status_code=201)
async def write(
    name: Name,
    path: str,
    request: Request,
    sandboxes: Service,
    mode: Annotated[str, Query(pattern="^0?[0-7]{1,4}$", description="Octal permission bits.")] = "644",
    parents: Annotated[bool, Query(description="Create missing parent directories.")] = False,
) -> Written:
    """Write the request body to the file, which appears whole or not at all."""
    full = guest_path("/" + path)
    if parents:
        await sandboxes.mkdir(name, posixpath.dirname(full), parents=True)
    size = await sandboxes.write_file(name, full, request.stream(), mode=int(mode, 8))
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
