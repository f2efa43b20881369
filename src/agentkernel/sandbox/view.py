"""The one public view of a sandbox: what the CLI's `list --json`, the HTTP API and MCP show of it."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from pydantic import BaseModel, Field

from agentkernel.sandbox.state import SandboxRecord, Status


class MountView(BaseModel):
    guest: str = Field(description="Where the sandbox sees the directory.")
    read_only: bool


class SandboxView(BaseModel):
    """A sandbox as its users see it; the same fields for every face.

    The rule: nothing of the host's file layout and nothing secret, for every face alike. The HTTP API
    may be reached from another machine and MCP is used by an agent, and the CLI shows what they show,
    so that a script written against one reads the others. So: no host paths (run directory, kernel,
    disk, the host side of a shared directory: a mount is its guest path and whether it is
    read-only), no owner marks, and of secrets and the environment only the names. The VMM's pid is
    shown: it is the local user's handle on the sandbox's process and reveals no file or value.
    """

    name: str
    status: Status
    backend: str = Field(description="qemu or firecracker (a VM), or container (not a VM).")
    image: str
    image_digest: str
    vcpus: int
    memory_mb: int
    profile: str
    pid: int | None = Field(description="The VMM's (or container's) process on the host, while it runs.")
    network: bool = Field(description="Whether it reaches the network (through the egress gateway).")
    read_only: bool = Field(description="Whether its root filesystem is read-only.")
    created_at: str
    mounts: list[MountView]
    lifetime_s: float | None = Field(description="Seconds it runs after each start before it is stopped.")
    stops_at: str | None = Field(description="When a running sandbox's lifetime ends (UTC).")
    lifetime_left_s: float | None = Field(
        None, description="Seconds until a running (or paused) sandbox's lifetime ends."
    )
    stop_reason: str | None = Field(description="Why it stopped or failed, when it did on its own.")
    snapshot: str | None = Field(description="The snapshot it was forked from.")
    secrets: list[str] = Field(description="The names of the secrets its gateway brokers for it.")
    env: list[str] = Field(description="The names of the variables set for every command in it.")
    labels: dict[str, str]

    @classmethod
    def of(cls, record: SandboxRecord) -> SandboxView:
        policy = record.effective_policy
        running = record.status in ("running", "paused") and record.deadline is not None
        return cls(
            name=record.name,
            status=record.status,
            backend=record.backend,
            image=record.image,
            image_digest=record.image_digest,
            vcpus=record.vcpus,
            memory_mb=record.memory_mb,
            profile=record.profile,
            pid=record.pid,
            network=policy.network,
            read_only=policy.read_only,
            created_at=record.created_at,
            mounts=[MountView(guest=m.guest, read_only=m.read_only) for m in record.mounts],
            lifetime_s=record.lifetime_s,
            stops_at=_utc(record.deadline) if running and record.deadline is not None else None,
            lifetime_left_s=(
                max(0.0, round(record.deadline - time.time(), 1))
                if running and record.deadline is not None
                else None
            ),
            stop_reason=record.stop_reason,
            snapshot=record.snapshot,
            secrets=sorted(str(s.get("name")) for s in record.secrets),
            env=sorted(record.env),
            labels=dict(record.labels),
        )

    def to_json(self) -> dict[str, Any]:
        """The view as JSON data (as the API sends it)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
