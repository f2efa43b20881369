"""Snapshots of running sandboxes, and new sandboxes forked from them.

A snapshot is a directory `snapshots/<name>/` with what the backend saved: the VM's device state, its
RAM and its disk (QEMU: `disk.qcow2` over the immutable image; Firecracker: a raw `rootfs.ext4`; the
backend's `snapshot_disk`), plus `snapshot.json`. It is written in a scratch directory and renamed
into place, so a failure leaves nothing. A fork resumes a copy: its RAM maps the snapshot's file
privately and its disk is its own overlay or copy of the snapshot's disk, so one snapshot can be
forked many times and every fork writes only its own copy.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from agentkernel import paths
from agentkernel.artifacts.cache import sha256_file
from agentkernel.backends import get_backend
from agentkernel.backends.base import SnapshotBackend
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit, sandboxes

META = "snapshot.json"


@dataclass(frozen=True)
class Snapshot:
    name: str
    path: Path
    meta: dict[str, Any]

    def public(self) -> dict[str, Any]:
        size = sum(p.stat().st_blocks * 512 for p in self.path.iterdir() if p.is_file())
        return {"name": self.name, "disk_bytes": size, **self.meta}


def snapshots_dir() -> Path:
    path = paths.data_dir() / "snapshots"
    path.mkdir(exist_ok=True)
    return path


def _hold_name(snapshot: str) -> str:
    return f"snapshot.{snapshot}"


def get(name: str) -> Snapshot:
    sandboxes.validate_name(name)
    path = snapshots_dir() / name
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        raise AgentkernelError(f"no snapshot named '{name}' (see `agentkernel snapshot list`)") from None
    return Snapshot(name, path, meta)


def list_snapshots() -> list[Snapshot]:
    names = sorted(p.name for p in snapshots_dir().iterdir() if (p / META).exists())
    return [get(name) for name in names]


async def create(sandbox: str, name: str) -> Snapshot:
    """Save running `sandbox` as snapshot `name`; the sandbox runs on."""
    sandboxes.validate_name(name)
    if (snapshots_dir() / name).exists():
        raise AgentkernelError(f"a snapshot named '{name}' already exists")
    record = sandboxes.get(sandbox)
    if record.status != "running" or record.pid is None:
        raise AgentkernelError(
            f"sandbox '{sandbox}' is not running (status: {record.status}): snapshot a running one"
        )
    backend = get_backend(record.backend)
    if not hasattr(backend, "snapshot"):
        raise AgentkernelError(f"the {record.backend} backend cannot take snapshots")
    spec = sandboxes.spec_of(record)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=snapshots_dir()))
    try:
        with sandboxes.locked(sandbox):
            await cast(SnapshotBackend, backend).snapshot(spec, record.pid, scratch)
        store.hold(store.HOLD_PREFIX + sandbox, _hold_name(name))  # the image the sandbox holds
        meta = {
            "source": sandbox,
            "created_at": sandboxes.now(),
            "backend": record.backend,
            "image": record.image,
            "image_digest": record.image_digest,
            "image_path": record.extra["image_path"],
            "kernel": record.extra["kernel"],
            "kernel_sha256": sha256_file(Path(record.extra["kernel"])),
            "vcpus": record.vcpus,
            "memory_mb": record.memory_mb,
            "profile": record.profile,
            "policy": record.extra.get("policy", {}),
            "lifetime_s": record.extra.get("lifetime_s"),
        }
        (scratch / META).write_text(json.dumps(meta, indent=2))
        scratch.rename(snapshots_dir() / name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        store.release(_hold_name(name))
        raise
    audit.record("snapshot", sandbox, snapshot=name)
    return get(name)


async def template(name: str, *, source: str, **options: Any) -> Snapshot:
    """Snapshot `name` of a new sandbox `source` (`options` as for sandboxes.create), booted and warmed
    so forks start with its page cache; `source` is removed afterwards. Many forks start from one."""
    sandboxes.create(source, **options)
    try:
        await sandboxes.start(source)
        await sandboxes.warm_up(source)
        return await create(source, name)
    finally:
        sandboxes.remove(source, force=True)


def remove(name: str) -> None:
    snapshot = get(name)
    users = [r.name for r in state.all_records() if r.extra.get("snapshot") == name]
    if users:
        raise AgentkernelError(
            f"snapshot '{name}' is in use by sandboxes {', '.join(users)}: remove them first"
        )
    shutil.rmtree(snapshot.path)
    store.release(_hold_name(name))
    audit.record("snapshot_remove", None, snapshot=name)


def _digest(path: Path) -> str:
    """The file's sha256, computed once per process for as long as the file is unchanged (every fork
    checks the kernel, and a pool or a stress run forks many times)."""
    info = path.stat()
    return _digest_of(path, info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest_of(path: Path, _inode: int, _size: int, _mtime_ns: int) -> str:
    return sha256_file(path)


async def fork(name: str, new_sandbox: str, *, extra: dict[str, Any] | None = None) -> SandboxRecord:
    """A new running sandbox resumed from snapshot `name`, with memory, devices and disk as they were
    (`extra` is added to its record)."""
    snapshot = get(name)
    sandboxes.validate_name(new_sandbox)
    meta = snapshot.meta
    kernel = Path(meta["kernel"])
    if not kernel.is_file() or _digest(kernel) != meta["kernel_sha256"]:
        raise AgentkernelError(
            f"snapshot '{name}' was made with a kernel that is no longer installed ({kernel}): "
            "it cannot be resumed; take a new snapshot"
        )
    backend = cast(SnapshotBackend, get_backend(meta["backend"]))
    record = sandboxes.new_record(
        new_sandbox,
        backend.name,
        image=meta["image"],
        image_digest=meta["image_digest"],
        vcpus=meta["vcpus"],
        memory_mb=meta["memory_mb"],
        profile=meta["profile"],
        extra={
            "kernel": str(kernel),
            "image_path": str(snapshot.path / backend.snapshot_disk),
            "image_format": backend.snapshot_disk_format,
            "restore_from": str(snapshot.path),
            "snapshot": name,
            "policy": meta["policy"],
            "mounts": [],
            "lifetime_s": meta["lifetime_s"],
            **(extra or {}),
        },
    )
    sandboxes.register(record, backend, hold=store.HOLD_PREFIX + _hold_name(name))
    try:
        return await sandboxes.start(new_sandbox)
    except BaseException:
        sandboxes.remove(new_sandbox, force=True)
        raise
