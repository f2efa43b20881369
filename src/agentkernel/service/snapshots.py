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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import anyio

from agentkernel import paths
from agentkernel.artifacts.cache import sha256_file
from agentkernel.backends import get_backend, registry
from agentkernel.backends.base import Backend, SnapshotBackend, VMSpec
from agentkernel.backends.firecracker import version as firecracker_version
from agentkernel.config import Policy
from agentkernel.errors import AgentkernelError, SandboxNotRunningError
from agentkernel.images import store
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit, owners, sandboxes
from agentkernel.service.checks import validate_name
from agentkernel.service.lifetimes import AS_SAVED, ForkLifetime

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
    validate_name(name)
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
    """Save running `sandbox` as snapshot `name`; the sandbox runs on. Blocking parts run in worker
    threads; the sandbox's state is checked under its lock."""
    validate_name(name)
    if (snapshots_dir() / name).exists():
        raise AgentkernelError(f"a snapshot named '{name}' already exists")
    await anyio.to_thread.run_sync(discard_partial)
    scratch = await anyio.to_thread.run_sync(_scratch, name)
    try:
        async with sandboxes.locked_async(sandbox) as lock:

            def current() -> SandboxRecord:
                with lock.held_here():
                    return sandboxes.get(sandbox)

            record = await anyio.to_thread.run_sync(current)
            if record.status != "running" or record.pid is None:
                raise SandboxNotRunningError(sandbox, record.status)
            if "snapshot" not in registry.info(record.backend).capabilities:
                raise AgentkernelError(f"the {record.backend} backend cannot take snapshots")
            backend = get_backend(record.backend)
            spec = sandboxes.spec_of(record)
            pid = record.pid
            vmm = await anyio.to_thread.run_sync(_vmm_version, backend, spec, pid)
            try:
                await cast(SnapshotBackend, backend).snapshot(spec, pid, scratch)
            except AgentkernelError as exc:
                reason = f"a snapshot failed: {exc}"
                await anyio.to_thread.run_sync(_mark_if_ended, record, backend, spec, reason)
                raise
        await anyio.to_thread.run_sync(_keep, sandbox, name, record, vmm, scratch)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_discard_scratch, name, scratch)
        raise
    audit.record("snapshot", sandbox, snapshot=name)
    return await anyio.to_thread.run_sync(get, name)


def _discard_scratch(name: str, scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    store.release(_hold_name(name))


def _keep(sandbox: str, name: str, record: SandboxRecord, vmm: dict[str, str], scratch: Path) -> None:
    """Write the snapshot's metadata and rename it into place."""
    store.hold(store.HOLD_PREFIX + sandbox, _hold_name(name))  # the image the sandbox holds
    meta = {
        "source": sandbox,
        "created_at": sandboxes.now(),
        "backend": record.backend,
        "image": record.image,
        "image_digest": record.image_digest,
        "image_path": record.image_path,
        "kernel": record.kernel,
        "kernel_sha256": sha256_file(Path(record.kernel)),
        "vcpus": record.vcpus,
        "memory_mb": record.memory_mb,
        "profile": record.profile,
        "policy": asdict(record.effective_policy),
        "lifetime_s": record.lifetime_s,
        **vmm,
    }
    paths.write_private(scratch / META, json.dumps(meta, indent=2))
    scratch.rename(snapshots_dir() / name)


def _vmm_version(backend: Backend, spec: VMSpec, pid: int) -> dict[str, str]:
    """The release of the VMM a snapshot is tied to, for its metadata (Firecracker's: fork()
    refuses a snapshot of another release)."""
    if backend.name != "firecracker":
        return {}
    from agentkernel.backends.firecracker.backend import FirecrackerBackend  # loaded by get_backend

    return {"firecracker_version": cast(FirecrackerBackend, backend).running_version(spec, pid)}


def _mark_if_ended(record: SandboxRecord, backend: Backend, spec: VMSpec, reason: str) -> None:
    """A snapshot that ended its sandbox's VM (a crash, or a backend that had to stop it) leaves
    the sandbox failed, with the snapshot's error as the reason."""
    assert record.pid is not None
    if not backend.is_alive(spec, record.pid):
        backend.cleanup(spec, keep_disk=True)
        state.update(record.name, status="failed", pid=None, stop_reason=reason)


def remove(name: str) -> None:
    snapshot = get(name)
    users = [r.name for r in state.all_records() if r.snapshot == name]
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


async def fork(
    name: str,
    new_sandbox: str,
    *,
    lifetime_s: ForkLifetime = AS_SAVED,
    pool: str | None = None,
    owned: bool = False,
) -> SandboxRecord:
    """A new running sandbox resumed from snapshot `name`, with memory, devices and disk as they were,
    ended `lifetime_s` after each start (None: when stopped; `pool`, `owned`: as for
    `sandboxes.create`). The lifetime is in its record before it starts, so no crash between the start
    and a later `set_timeout` can leave it running for ever."""
    validate_name(new_sandbox)
    await anyio.to_thread.run_sync(
        functools.partial(_register_fork, name, new_sandbox, lifetime_s=lifetime_s, pool=pool, owned=owned)
    )
    try:
        return await sandboxes.start(new_sandbox)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, new_sandbox, force=True))
        raise


def _register_fork(
    name: str,
    new_sandbox: str,
    *,
    lifetime_s: ForkLifetime,
    pool: str | None,
    owned: bool,
) -> None:
    snapshot = get(name)
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
        kernel=str(kernel),
        image_path=str(snapshot.path / backend.snapshot_disk),
        image_format=backend.snapshot_disk_format,
        restore_from=str(snapshot.path),
        snapshot=name,
        policy=Policy.from_record(meta["policy"]) if meta.get("policy") else None,
        lifetime_s=meta["lifetime_s"] if isinstance(lifetime_s, str) else lifetime_s,
        pool=pool,
        owner=owners.current() if owned else None,
    )
    sandboxes.register(record, backend, hold=store.HOLD_PREFIX + _hold_name(name))
