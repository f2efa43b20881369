"""The MCP server's tools for a sandbox's lifetime, pause and resume, snapshots and forks.

`lifecycle_tools` gives each tool function with its annotations; `server.build_server` registers them
like its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from agentkernel.sandbox.view import SandboxView
from agentkernel.service.lifetimes import fork_lifetime
from agentkernel.service.service import SandboxService
from agentkernel.service.snapshots import Snapshot

SandboxName = Annotated[str, Field(description="The sandbox's name.")]
SnapshotName = Annotated[str, Field(description="The snapshot's name.")]
Lifetime = Annotated[
    float,
    Field(
        ge=0,
        description="Seconds from now until the sandbox is stopped (at most 30 days); 0: it runs "
        "until stopped or removed.",
    ),
]


class SnapshotInfo(BaseModel):
    name: str
    source: str = Field(description="The sandbox it was taken of.")
    created_at: str
    image: str
    disk_bytes: int = Field(description="Bytes it takes on the host's disk.")

    @classmethod
    def of(cls, snapshot: Snapshot) -> SnapshotInfo:
        return cls.model_validate({k: v for k, v in snapshot.public().items() if k in cls.model_fields})


class Snapshots(BaseModel):
    snapshots: list[SnapshotInfo]


class Removed(BaseModel):
    ok: bool = True
    detail: str


def _hints(*, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=False,
    )


def lifecycle_tools(
    sandboxes: SandboxService, *, default_lifetime: float | None
) -> list[tuple[Callable[..., Awaitable[Any]], ToolAnnotations]]:
    """The tools; a fork made without a lifetime gets `default_lifetime` (None: none)."""

    async def set_sandbox_timeout(name: SandboxName, timeout: Lifetime) -> SandboxView:
        """Change when a running (or paused) sandbox is stopped: `timeout` seconds from now, earlier
        or later than before; 0 lets it run until stopped. lifetime_left_s in the result shows it."""
        return SandboxView.of(await sandboxes.set_timeout(name, timeout))

    async def pause_sandbox(name: SandboxName) -> SandboxView:
        """Freeze a running sandbox: its processes stop where they are and its memory is kept. Commands
        and file tools on it fail until resume_sandbox; its lifetime keeps running."""
        return SandboxView.of(await sandboxes.pause(name))

    async def resume_sandbox(name: SandboxName) -> SandboxView:
        """Let a paused sandbox's processes run on from where they were."""
        return SandboxView.of(await sandboxes.resume(name))

    async def snapshot_sandbox(
        name: SandboxName, snapshot: Annotated[str, Field(description="Name for the snapshot.")]
    ) -> SnapshotInfo:
        """Save a running sandbox (memory, processes, disk) as a snapshot; the sandbox runs on.
        fork_snapshot starts copies of it."""
        return SnapshotInfo.of(await sandboxes.snapshot(name, snapshot))

    async def list_snapshots() -> Snapshots:
        """The snapshots there are."""
        return Snapshots(snapshots=[SnapshotInfo.of(s) for s in await sandboxes.list_snapshots()])

    async def fork_snapshot(
        snapshot: SnapshotName,
        name: Annotated[
            str | None, Field(description="Name for the new sandbox (default: sandbox-XXXXXXXX).")
        ] = None,
        timeout: Annotated[
            float | None,
            Field(ge=0, description="Its lifetime in seconds (default: the server's; 0: none)."),
        ] = None,
    ) -> SandboxView:
        """Start a new sandbox from a snapshot: its processes, memory and files as they were saved."""
        lifetime = fork_lifetime(timeout, default_lifetime)
        record = await sandboxes.fork(snapshot, name, lifetime=lifetime)
        return SandboxView.of(record)

    async def remove_snapshot(snapshot: SnapshotName) -> Removed:
        """Remove a snapshot (refused while sandboxes forked from it exist)."""
        await sandboxes.remove_snapshot(snapshot)
        return Removed(detail=f"removed snapshot {snapshot}")

    changes = _hints(read_only=False, destructive=False, idempotent=False)
    return [
        (set_sandbox_timeout, _hints(read_only=False, destructive=False, idempotent=True)),
        (pause_sandbox, _hints(read_only=False, destructive=False, idempotent=True)),
        (resume_sandbox, _hints(read_only=False, destructive=False, idempotent=True)),
        (snapshot_sandbox, changes),
        (list_snapshots, _hints(read_only=True, destructive=False, idempotent=True)),
        (fork_snapshot, changes),
        (remove_snapshot, _hints(read_only=False, destructive=True, idempotent=False)),
    ]
