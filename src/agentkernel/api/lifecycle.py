"""A running sandbox's lifetime, pause and resume, snapshots and forks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field

from agentkernel.api.models import SandboxName, _Request
from agentkernel.api.routes import BODY, Name, Service, problems
from agentkernel.sandbox.view import SandboxView
from agentkernel.service.checks import NAME_RE
from agentkernel.service.lifetimes import fork_lifetime
from agentkernel.service.snapshots import Snapshot

router = APIRouter(responses=problems(401, 422))
SnapshotName = Annotated[str, Path(pattern=f"^{NAME_RE.pattern}$", description="Snapshot name.")]

Lifetime = Annotated[
    float,
    Field(
        ge=0,
        description="Seconds from now until the sandbox is stopped (at most 30 days); 0: it runs "
        "until stopped.",
    ),
]


class TimeoutRequest(_Request):
    timeout: Lifetime


class SnapshotRequest(_Request):
    name: SandboxName = Field(description="Name for the snapshot.")


class ForkRequest(_Request):
    name: SandboxName | None = Field(
        None, description="Name for the new sandbox (default: sandbox-XXXXXXXX)."
    )
    timeout: Lifetime | None = Field(
        None, description="Lifetime of the new sandbox in seconds (default: the server's; 0: none)."
    )


class SnapshotView(BaseModel):
    """A snapshot as its users see it (no host paths)."""

    name: str
    source: str = Field(description="The sandbox it was taken of.")
    created_at: str
    backend: str
    image: str
    image_digest: str
    vcpus: int
    memory_mb: int
    profile: str
    disk_bytes: int = Field(description="Bytes it takes on the host's disk.")

    @classmethod
    def of(cls, snapshot: Snapshot) -> SnapshotView:
        return cls.model_validate({k: v for k, v in snapshot.public().items() if k in cls.model_fields})


@router.post("/sandboxes/{name}/timeout", tags=["sandboxes"], responses={**BODY, **problems(404, 409)})
async def set_timeout(name: Name, body: TimeoutRequest, sandboxes: Service) -> SandboxView:
    """Stop a running (or paused) sandbox `timeout` seconds from now, earlier or later than its
    lifetime would have; 0 removes its lifetime. Later starts get its lifetime again."""
    return SandboxView.of(await sandboxes.set_timeout(name, body.timeout))


@router.post("/sandboxes/{name}/pause", tags=["sandboxes"], responses=problems(404, 409))
async def pause_sandbox(name: Name, sandboxes: Service) -> SandboxView:
    """Stop a running sandbox's vCPUs, its memory kept on the host; commands and file operations are
    refused (409) until it is resumed. Its lifetime runs on. 409 on a backend that cannot pause."""
    return SandboxView.of(await sandboxes.pause(name))


@router.post("/sandboxes/{name}/resume", tags=["sandboxes"], responses=problems(404, 409))
async def resume_sandbox(name: Name, sandboxes: Service) -> SandboxView:
    """Let a paused sandbox's processes run on where they were."""
    return SandboxView.of(await sandboxes.resume(name))


@router.post(
    "/sandboxes/{name}/snapshots",
    tags=["snapshots"],
    status_code=201,
    responses={**BODY, **problems(404, 409)},
)
async def create_snapshot(name: Name, body: SnapshotRequest, sandboxes: Service) -> SnapshotView:
    """Save a running sandbox's memory, devices and disk as a snapshot; the sandbox runs on."""
    return SnapshotView.of(await sandboxes.snapshot(name, body.name))


@router.get("/snapshots", tags=["snapshots"])
async def list_snapshots(sandboxes: Service) -> list[SnapshotView]:
    return [SnapshotView.of(s) for s in await sandboxes.list_snapshots()]


@router.get("/snapshots/{snapshot}", tags=["snapshots"], responses=problems(404))
async def get_snapshot(snapshot: SnapshotName, sandboxes: Service) -> SnapshotView:
    return SnapshotView.of(await sandboxes.get_snapshot(snapshot))


@router.delete("/snapshots/{snapshot}", tags=["snapshots"], status_code=204, responses=problems(404, 409))
async def remove_snapshot(snapshot: SnapshotName, sandboxes: Service) -> Response:
    """Remove a snapshot (refused while sandboxes forked from it exist)."""
    await sandboxes.remove_snapshot(snapshot)
    return Response(status_code=204)


@router.post(
    "/snapshots/{snapshot}/fork",
    tags=["snapshots"],
    status_code=201,
    responses={**BODY, **problems(404, 409)},
)
async def fork_snapshot(
    snapshot: SnapshotName, body: ForkRequest, sandboxes: Service, request: Request
) -> SandboxView:
    """A new running sandbox resumed from a snapshot: its processes, memory and disk as they were."""
    lifetime = fork_lifetime(body.timeout, request.app.state.default_lifetime)
    record = await sandboxes.fork(snapshot, body.name, lifetime=lifetime)
    return SandboxView.of(record)
