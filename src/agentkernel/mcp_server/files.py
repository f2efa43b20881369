"""The MCP server's file tools beyond read/write/list: stat, make a directory, move, remove, watch.

`file_tools` gives each tool function with its annotations; `server.build_server` registers them like
its own. Modes are octal strings ("0644"), as on every face.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from agentkernel.errors import FileOpError
from agentkernel.service.files import MODE_DESCRIPTION, MODE_PATTERN, format_mode, parse_mode
from agentkernel.service.service import SandboxService

SandboxName = Annotated[str, Field(description="The sandbox's name.")]
GuestPath = Annotated[str, Field(description="Absolute path in the sandbox.")]
MAX_WATCH_SECONDS = 60.0
MAX_WATCH_EVENTS = 1000


class PathInfo(BaseModel):
    path: str
    exists: bool
    kind: Literal["file", "dir", "symlink", "other"] | None = Field(
        default=None, description="What is there (a final symlink followed); None when nothing is."
    )
    size: int | None = None
    mode: str | None = Field(default=None, description=MODE_DESCRIPTION)


class Moved(BaseModel):
    ok: bool = True
    detail: str
    path: str = Field(description="Where it is now.")


class Change(BaseModel):
    name: str = Field(description="Path relative to the watched directory ('' for the directory itself).")
    kind: str = Field(description="file or dir.")
    event: str = Field(
        description="create, write (a file written and closed), remove, moved_from, moved_to, chmod, "
        "overflow (changes were dropped: list the directory again) or gone (the directory was removed)."
    )


class Changes(BaseModel):
    path: str
    changes: list[Change]
    complete: bool = Field(
        description="False when max_events was reached before the time was up: call again for more."
    )


def _hints(*, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=False,
    )


def file_tools(sandboxes: SandboxService) -> list[tuple[Callable[..., Awaitable[Any]], ToolAnnotations]]:
    async def stat_path(name: SandboxName, path: GuestPath) -> PathInfo:
        """Whether a path exists in a sandbox, and if so what it is: kind, size, mode."""
        try:
            info = await sandboxes.stat(name, path)
        except FileOpError as exc:
            if exc.code != "file_not_found":
                raise
            return PathInfo(path=path, exists=False)
        shown = {"kind": info.kind, "size": info.size, "mode": format_mode(info.mode)}
        return PathInfo.model_validate({"path": path, "exists": True, **shown})

    async def make_directory(
        name: SandboxName,
        path: GuestPath,
        mode: Annotated[str, Field(pattern=MODE_PATTERN, description=MODE_DESCRIPTION)] = "0755",
    ) -> Moved:
        """Make a directory in a sandbox, with any missing parents (an existing one is fine)."""
        await sandboxes.mkdir(name, path, parents=True, mode=parse_mode(mode))
        return Moved(detail=f"made {path}", path=path)

    async def move_path(
        name: SandboxName,
        path: GuestPath,
        to: Annotated[str, Field(description="The new absolute path; a file there is replaced.")],
    ) -> Moved:
        """Move or rename a file or directory in a sandbox."""
        await sandboxes.rename(name, path, to)
        return Moved(detail=f"moved {path} to {to}", path=to)

    async def remove_path(
        name: SandboxName,
        path: GuestPath,
        recursive: Annotated[bool, Field(description="Remove a directory and everything in it.")] = False,
    ) -> Moved:
        """Remove a file, a symlink or an empty directory (with recursive, a whole tree) in a sandbox."""
        await sandboxes.remove_path(name, path, recursive=recursive)
        return Moved(detail=f"removed {path}", path=path)

    async def watch_directory(
        name: SandboxName,
        path: Annotated[str, Field(description="Absolute path of a directory in the sandbox.")],
        seconds: Annotated[
            float,
            Field(
                description=f"How long to watch (at most {MAX_WATCH_SECONDS:g}).", gt=0, le=MAX_WATCH_SECONDS
            ),
        ] = 10.0,
        max_events: Annotated[
            int,
            Field(description="Return as soon as this many changes were seen.", ge=1, le=MAX_WATCH_EVENTS),
        ] = 100,
        recursive: Annotated[bool, Field(description="Watch the directories below it too.")] = False,
    ) -> Changes:
        """Watch a directory in a sandbox for `seconds` and return the changes seen (files created,
        written, removed, moved), or as soon as `max_events` were seen or the directory is gone."""
        watcher = await sandboxes.watch(name, path, recursive=recursive)
        changes: list[Change] = []
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    async for change in watcher.events():
                        changes.append(Change(name=change.name, kind=change.kind, event=change.event))
                        if len(changes) >= max_events:
                            break
        finally:
            watcher.close()
        return Changes(path=path, changes=changes, complete=len(changes) < max_events)

    read_only = _hints(read_only=True, destructive=False, idempotent=True)
    return [
        (stat_path, read_only),
        (make_directory, _hints(read_only=False, destructive=False, idempotent=True)),
        (move_path, _hints(read_only=False, destructive=True, idempotent=False)),
        (remove_path, _hints(read_only=False, destructive=True, idempotent=True)),
        (watch_directory, read_only),
    ]
