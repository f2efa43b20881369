"""Everything the dashboard asks of the service and the host, in one place: the pages only render it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import shutil
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import HTTPConnection

from agentkernel import hostinfo, metrics, paths
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.protocol.connection import BackgroundInfo, FileInfo
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit
from agentkernel.service.checks import parse_labels
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import SandboxService

AUDIT_ENTRIES = 200
"""The newest audit entries one sandbox's page shows."""
CONSOLE_BYTES = 16 << 10
"""The end of the console log a sandbox's page shows."""


def _service(conn: HTTPConnection) -> SandboxService:
    service: SandboxService = conn.app.state.service
    return service


@dataclass(frozen=True)
class Row:
    """One sandbox as the list shows it."""

    name: str
    status: str
    image: str
    backend: str
    profile: str
    vcpus: int
    memory_mb: int
    created_at: str
    labels: dict[str, str]
    age_s: int | None
    lifetime_left_s: int | None
    rss_bytes: int | None

    @classmethod
    def of(cls, record: SandboxRecord) -> Row:
        now = time.time()
        try:
            created = dt.datetime.fromisoformat(record.created_at.replace("Z", "+00:00")).timestamp()
            age: int | None = max(0, int(now - created))
        except ValueError:
            age = None
        deadline = record.deadline
        running = record.status == "running" and record.pid is not None
        left = max(0, int(deadline - now)) if running and isinstance(deadline, int | float) else None
        memory = metrics.vmm_memory(record.pid) if running and record.pid else None
        return cls(
            name=record.name,
            status=record.status,
            image=record.image,
            backend=record.backend,
            profile=record.profile,
            vcpus=record.vcpus,
            memory_mb=record.memory_mb,
            created_at=record.created_at,
            labels=dict(record.labels),
            age_s=age,
            lifetime_left_s=left,
            rss_bytes=memory.get("rss") if memory else None,
        )

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def labels(text: str) -> dict[str, str]:
    """`key=value` pairs separated by commas or spaces, as the list's label filter takes them."""
    return parse_labels(text.replace(",", " ").split())


async def rows(conn: HTTPConnection, *, wanted: dict[str, str] | None = None) -> list[Row]:
    records = await _service(conn).list_sandboxes(labels=wanted)
    return await anyio.to_thread.run_sync(lambda: [Row.of(r) for r in records])


async def record(conn: HTTPConnection, name: str) -> SandboxRecord:
    return await _service(conn).get(name)


def policy(record: SandboxRecord) -> dict[str, Any]:
    return dataclasses.asdict(record.effective_policy)


async def create(conn: HTTPConnection, name: str | None, flags: SandboxFlags) -> SandboxRecord:
    service = _service(conn)
    return await service.create(await service.resolve(flags), name=name, start=True)


async def fork(conn: HTTPConnection, snapshot: str, name: str) -> SandboxRecord:
    return await _service(conn).fork(snapshot, name)


async def start(conn: HTTPConnection, name: str) -> None:
    await _service(conn).start(name)


async def stop(conn: HTTPConnection, name: str) -> None:
    await _service(conn).stop(name)


async def remove(conn: HTTPConnection, name: str) -> None:
    await _service(conn).remove(name, force=True)


def _tail(path: os.PathLike[str] | str, size: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read(size).decode("utf-8", "replace")
    except OSError:
        return ""


async def console_tail(conn: HTTPConnection, name: str) -> str:
    return await anyio.to_thread.run_sync(_tail, await _service(conn).console_log(name), CONSOLE_BYTES)


def _audit_trail(name: str) -> list[dict[str, Any]]:
    return list(deque(audit.entries(name), maxlen=AUDIT_ENTRIES))


async def audit_trail(name: str) -> list[dict[str, Any]]:
    """The sandbox's newest audit entries, newest first."""
    return list(reversed(await anyio.to_thread.run_sync(_audit_trail, name)))


async def background(conn: HTTPConnection, name: str) -> list[BackgroundInfo]:
    """The sandbox's background commands, oldest first."""
    return await _service(conn).list_commands(name)


async def list_dir(conn: HTTPConnection, name: str, path: str) -> list[FileInfo]:
    entries = await _service(conn).list_dir(name, path)
    return sorted(entries, key=lambda e: (e.kind != "dir", e.name))


async def open_file(
    conn: HTTPConnection, name: str, path: str
) -> tuple[FileInfo, AsyncGenerator[bytes, None]]:
    return await _service(conn).open_file(name, path)


async def write_file(conn: HTTPConnection, name: str, path: str, chunks: AsyncIterator[bytes]) -> int:
    return await _service(conn).write_file(name, path, chunks)


def _host() -> dict[str, Any]:
    acc = hostinfo.accel()
    backends = {
        name: {"available": s.available, "reason": s.reason} for name, s in hostinfo.backends().items()
    }
    try:
        pool: dict[str, Any] | None = metrics.pool_status()
    except AgentkernelError:
        pool = None
    images = []
    for image in store.list_images():
        try:
            used = image.path.stat().st_blocks * 512  # sparse files: the bytes on disk, not the length
        except OSError:
            used = None
        images.append({"name": image.name, "digest": image.digest[:19], "disk_bytes": used})
    disk = shutil.disk_usage(paths.data_dir())
    return {
        "accel": {"name": acc.name, "note": acc.note},
        "backends": backends,
        "pool": pool,
        "images": images,
        "disk": {"path": str(paths.data_dir()), "total": disk.total, "used": disk.used, "free": disk.free},
    }


async def host() -> dict[str, Any]:
    """The host's acceleration, backends, images and disk, and the pool daemon's status (None if it
    does not run)."""
    return await anyio.to_thread.run_sync(_host)


def events(trail: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The audit entries of one kind: `exec` (commands that ended), `network` (egress decisions)."""
    return list(itertools.islice((e for e in trail if e.get("event") == kind), AUDIT_ENTRIES))
