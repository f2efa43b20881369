"""Snapshots of running sandboxes, and new sandboxes forked from them.

A snapshot is a directory `snapshots/<name>/` with what the backend saved: the VM's device state, its
RAM and its disk (QEMU: `disk.qcow2` over the immutable image; Firecracker: a raw `rootfs.ext4`; the
backend's `snapshot_disk`), plus `snapshot.json`. It is written in a scratch directory and renamed
into place, so a failure leaves nothing; the scratch directory of a maker that was killed is
removed by the next snapshot or the next pool daemon (`discard_partial`). A fork resumes a copy:
its RAM maps the snapshot's file privately and its disk is its own overlay or copy of the
snapshot's disk, so one snapshot can be forked many times and every fork writes only its own copy.
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
from agentkernel.backends import firecracker_version, get_backend
from agentkernel.backends.base import Backend, SnapshotBackend, VMSpec
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit, owners, sandboxes

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
    return paths.private_dir(paths.data_dir() / "snapshots")


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
    names = sorted(
        p.name for p in snapshots_dir().iterdir() if not p.name.startswith(".") and (p / META).exists()
    )
    return [get(name) for name in names]


def _scratch(name: str) -> Path:
    """A new scratch directory to write snapshot `name` in, named after its maker (an `owners`
    mark): `.PID.START.NAME.RANDOM`, hidden from `list_snapshots` until it is renamed into place."""
    mark = owners.current()
    return Path(tempfile.mkdtemp(prefix=f".{mark['pid']}.{mark['start']}.{name}.", dir=snapshots_dir()))


def discard_partial() -> list[str]:
    """Remove the scratch directories of snapshots whose maker died while writing them, and the
    image holds taken for them: a half-written snapshot is never used, nor kept. The names of the
    snapshots whose scratch was removed."""
    found = []
    for path in snapshots_dir().iterdir():
        parts = path.name[1:].split(".", 2) if path.name.startswith(".") else []
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        if owners.is_alive({"pid": int(parts[0]), "start": int(parts[1])}):
            continue
        name = parts[2].rsplit(".", 1)[0]
        shutil.rmtree(path, ignore_errors=True)
        if not (snapshots_dir() / name).exists():
            store.release(_hold_name(name))
        found.append(name)
        audit.record("snapshot_discard", None, snapshot=name, reason="its maker died while writing it")
    return found


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
    discard_partial()
    scratch = _scratch(name)
    try:
        with sandboxes.locked(sandbox):
            vmm = _vmm_version(backend, spec, record.pid)
            try:
                await cast(SnapshotBackend, backend).snapshot(spec, record.pid, scratch)
            except AgentkernelError as exc:
                _mark_if_ended(record, backend, spec, f"a snapshot failed: {exc}")
                raise
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
            **vmm,
        }
        paths.write_private(scratch / META, json.dumps(meta, indent=2))
        scratch.rename(snapshots_dir() / name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        store.release(_hold_name(name))
        raise
    audit.record("snapshot", sandbox, snapshot=name)
    return get(name)


def _vmm_version(backend: Backend, spec: VMSpec, pid: int) -> dict[str, str]:
    """The release of the VMM a snapshot is tied to, for its metadata (Firecracker's: fork()
    refuses a snapshot of another release)."""
    if backend.name != "firecracker":
        return {}
    from agentkernel.backends.firecracker import FirecrackerBackend  # loaded already, by get_backend

    return {"firecracker_version": cast(FirecrackerBackend, backend).running_version(spec, pid)}


def _mark_if_ended(record: SandboxRecord, backend: Backend, spec: VMSpec, reason: str) -> None:
    """A snapshot that ended its sandbox's VM (a crash, or a backend that had to stop it) leaves
    the sandbox failed, with the snapshot's error as the reason."""
    assert record.pid is not None
    if not backend.is_alive(spec, record.pid):
        backend.cleanup(spec, keep_disk=True)
        state.update(record.name, status="failed", pid=None, extra={**record.extra, "stop_reason": reason})


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
    if meta["backend"] == "firecracker":
        firecracker_version.check_snapshot_version(name, meta.get("firecracker_version"))
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
