"""Sandbox life cycle: create, start, stop, remove, list, and sessions to run commands in one.

This is the one implementation behind the CLI (and later the HTTP API and MCP server). A sandbox's
record lives in SQLite; its VMM runs detached; any process reaches its agent through the sandbox's
sockets. Status is reconciled with reality on every read: a VMM that died shows as failed (or stopped,
when the guest powered itself off).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.backends import get_backend
from agentkernel.backends.base import Backend, VMSpec
from agentkernel.config import Config, image_name
from agentkernel.detect import detect_image
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.protocol.client import Connection
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
POWERED_OFF = b"reboot: Restarting system"


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 70 else name[:70] + "..."
        raise AgentkernelError(
            f"invalid sandbox name {shown!r}: use 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def runtime_base() -> Path:
    """A short, private directory for sockets (Unix socket paths are limited to 107 bytes)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "agentkernel" if xdg else Path(f"/tmp/agentkernel-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = base.lstat()
    if base.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise AgentkernelError(f"{base} is not a private directory of this user: refusing to use it")
    return base


def spec_of(record: SandboxRecord) -> VMSpec:
    return VMSpec(
        name=record.name,
        kernel=Path(record.extra["kernel"]),
        image=Path(record.extra["image_path"]),
        workdir=paths.data_dir() / "sandboxes" / record.name,
        rundir=Path(record.rundir),
        vcpus=record.vcpus,
        memory_mb=record.memory_mb,
    )


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serializes life-cycle changes of one sandbox across processes."""
    locks = paths.data_dir() / "locks"
    locks.mkdir(exist_ok=True)
    with (locks / f"{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def reconcile(record: SandboxRecord) -> SandboxRecord:
    """Bring a record's status in line with the VMM process it names."""
    if record.status != "running" or record.pid is None:
        return record
    backend = get_backend(record.backend)
    spec = spec_of(record)
    if backend.is_alive(spec, record.pid):
        return record
    record.status = "stopped" if _powered_off(spec) else "failed"
    record.pid = None
    state.update(record.name, status=record.status, pid=None)
    return record


def _powered_off(spec: VMSpec) -> bool:
    try:
        with spec.console_log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return POWERED_OFF in f.read()
    except OSError:
        return False


def get(name: str) -> SandboxRecord:
    return reconcile(state.get(validate_name(name)))


def list_sandboxes() -> list[SandboxRecord]:
    return [reconcile(r) for r in state.all_records()]


def create(
    name: str,
    *,
    image: str = "base",
    vcpus: int = 1,
    memory_mb: int = 512,
    profile: str = "moderate",
    backend: str = "qemu",
) -> SandboxRecord:
    """Make a sandbox (its own disk over the image); it is not started."""
    validate_name(name)
    if not 1 <= vcpus <= 32:
        raise AgentkernelError(f"--vcpus must be between 1 and 32 (got {vcpus})")
    if not 64 <= memory_mb <= 65536:
        raise AgentkernelError(f"--memory must be between 64 and 65536 MB (got {memory_mb})")
    vmm = get_backend(backend)
    img = store.get(image)
    vmlinux = kernel_artifact.current()
    if vmlinux is None:
        raise AgentkernelError("no guest kernel: run `agentkernel setup`")
    record = SandboxRecord(
        name=name,
        backend=vmm.name,
        image=img.name,
        image_digest=img.digest,
        vcpus=vcpus,
        memory_mb=memory_mb,
        profile=profile,
        status="stopped",
        pid=None,
        rundir=str(runtime_base() / secrets.token_hex(6)),
        created_at=_now(),
        extra={"kernel": str(vmlinux), "image_path": str(img.path)},
    )
    with _locked(name):
        state.insert(record)  # fails if the name is taken, before anything is made
        try:
            store.hold(img.name, name)
            vmm.prepare(spec_of(record))
        except BaseException:
            vmm.cleanup(spec_of(record), keep_disk=False)
            store.release(name)
            state.delete(name)
            raise
    return record


async def start(name: str, *, timeout: float = BOOT_TIMEOUT) -> SandboxRecord:
    """Boot the sandbox and wait until its agent answers."""
    async with _booted(name, timeout=timeout) as (record, _conn):
        return record


@contextlib.asynccontextmanager
async def _booted(name: str, *, timeout: float) -> AsyncIterator[tuple[SandboxRecord, Connection]]:
    """Boot the sandbox and keep the first agent connection open for the caller."""
    stack = contextlib.AsyncExitStack()
    with _locked(name):
        record = get(name)
        if record.status == "running":
            raise AgentkernelError(f"sandbox '{name}' is already running")
        backend = get_backend(record.backend)
        spec = spec_of(record)
        pid = backend.start(spec)
        state.update(name, status="running", pid=pid)
        try:
            conn = await stack.enter_async_context(_session(backend, spec, pid, timeout=timeout))
        except BaseException:
            backend.kill(spec, pid)
            backend.cleanup(spec, keep_disk=True)
            state.update(name, status="failed", pid=None)
            raise
    record.status, record.pid = "running", pid
    async with stack:
        yield record, conn


@contextlib.asynccontextmanager
async def ephemeral(
    *,
    image: str,
    vcpus: int,
    memory_mb: int,
    profile: str,
    backend: str = "qemu",
    name: str | None = None,
    keep: bool = False,
) -> AsyncIterator[tuple[str, Connection]]:
    """A new sandbox, booted, with a connection to its agent; removed afterwards unless `keep`."""
    name = validate_name(name) if name else new_ephemeral_name()
    create(name, image=image, vcpus=vcpus, memory_mb=memory_mb, profile=profile, backend=backend)
    try:
        async with _booted(name, timeout=BOOT_TIMEOUT) as (_record, conn):
            yield name, conn
    finally:
        if not keep:
            remove(name, force=True)


async def stop(name: str, *, timeout: float = STOP_TIMEOUT) -> SandboxRecord:
    """Power the guest off cleanly (filesystems synced); kill the VMM if it does not exit in time."""
    with _locked(name):
        record = get(name)
        backend = get_backend(record.backend)
        spec = spec_of(record)
        if record.status == "running" and record.pid is not None:
            await _shutdown(backend, spec, record.pid, timeout)
        backend.cleanup(spec, keep_disk=True)
        state.update(name, status="stopped", pid=None)
        record.status, record.pid = "stopped", None
        return record


async def _shutdown(backend: Backend, spec: VMSpec, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(AgentkernelError, TimeoutError):
        async with _session(backend, spec, pid, timeout=min(timeout, 5)) as conn:
            await conn.shutdown()
            while backend.is_alive(spec, pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
    backend.kill(spec, pid)


def remove(name: str, *, force: bool = False) -> None:
    """Delete a sandbox and everything it has on disk. A running one needs `force`."""
    with _locked(name):
        record = get(name)
        backend = get_backend(record.backend)
        spec = spec_of(record)
        if record.status == "running" and record.pid is not None:
            if not force:
                raise AgentkernelError(f"sandbox '{name}' is running: stop it first or use --force")
            backend.kill(spec, record.pid)
        backend.cleanup(spec, keep_disk=False)
        store.release(name)
        state.delete(name)
    with contextlib.suppress(OSError):
        (paths.data_dir() / "locks" / f"{name}.lock").unlink()


@contextlib.asynccontextmanager
async def session(name: str, *, timeout: float = 30.0) -> AsyncIterator[Connection]:
    """A connection to a running sandbox's agent, on a port no other process is using."""
    record = get(name)
    if record.status != "running" or record.pid is None:
        raise AgentkernelError(
            f"sandbox '{name}' is not running (status: {record.status}): "
            f"start it with `agentkernel start {name}`"
        )
    async with _session(get_backend(record.backend), spec_of(record), record.pid, timeout=timeout) as conn:
        yield conn


@contextlib.asynccontextmanager
async def _session(backend: Backend, spec: VMSpec, pid: int, *, timeout: float) -> AsyncIterator[Connection]:
    deadline = time.monotonic() + timeout
    async with _port_lock(spec, backend.agent_ports, deadline) as port:
        conn = await backend.connect(spec, pid, port=port, timeout=max(0.1, deadline - time.monotonic()))
        try:
            yield conn
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def _port_lock(spec: VMSpec, ports: int, deadline: float) -> AsyncIterator[int]:
    """Take a free agent port of the sandbox (a host-side file lock per port), waiting for one."""
    while True:
        for port in range(ports):
            f = (spec.rundir / f"agent{port}.lock").open("w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield port
            finally:
                f.close()
            return
        if time.monotonic() > deadline:
            raise AgentkernelError(f"sandbox '{spec.name}' is busy: {ports} clients are connected to it")
        await asyncio.sleep(0.05)


def choose_image(command: list[str], image: str | None, config: Config, project_dir: Path) -> tuple[str, str]:
    """The image for a command and why: --image > agentkernel.toml > the command > project files > base."""
    if image:
        return image, "--image"
    if config.sandbox.base_image:
        return image_name(config.sandbox.base_image), "agentkernel.toml"
    return detect_image(command, project_dir)


def new_ephemeral_name() -> str:
    return f"run-{secrets.token_hex(4)}"
