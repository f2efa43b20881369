"""Sandbox life cycle: create, start, stop, remove, list, and sessions to run commands in one.

This is the one implementation behind the CLI, the HTTP API and the MCP server. A sandbox's
record lives in SQLite; its VMM runs detached; any process reaches its agent through the sandbox's
sockets. Status is reconciled with reality on every read: a VMM that died shows as failed (or stopped,
when the guest powered itself off).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from agentkernel import hostinfo, paths
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.backends import firecracker_version, get_backend
from agentkernel.backends.base import Backend, Mount, SnapshotBackend, VMSpec, exit_reason, file_tail
from agentkernel.config import DEFAULT_MEMORY_MB, DEFAULT_VCPUS, PROFILES, Config, Policy, image_name
from agentkernel.detect import detect_image
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.network import launcher as gateway
from agentkernel.network.brokering import SecretBinding, guest_env
from agentkernel.network.policy import EgressRules
from agentkernel.pool import wire
from agentkernel.protocol.client import AgentConnectionError, Connection
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit, diskspace, owners

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
VMM_EXIT_WAIT = 1.0
POWERED_OFF = (b"reboot: Restarting system", b"agentkernel-agent: shutting down")  # VM, container
WORKSPACE = "/workspace"
PASS_ENV = frozenset({"LANG", "LANGUAGE", "TZ", "TERM", "COLORTERM"})  # with pass_env, plus LC_*
STARTER = "starter"
"""The record of a sandbox being started names the process starting it (an `owners` mark), from
before its VMM is spawned until its pid is recorded: if that process dies meanwhile, `reconcile`
finds and kills what it started."""
INTERRUPTED = "its start was interrupted"


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 70 else name[:70] + "..."
        raise AgentkernelError(
            f"invalid sandbox name {shown!r}: use 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def policy_of(record: SandboxRecord) -> Policy:
    """The policy a sandbox runs with, as its record keeps it (its profile's if the record has none)."""
    data = record.extra.get("policy")
    return Policy.from_record(data) if data else PROFILES[record.profile]


def spec_of(record: SandboxRecord) -> VMSpec:
    """The VM a record describes. Every path that starts, resumes or reaches a sandbox (create, start,
    fork, the pool, the API and MCP) gets its spec here, so the policy's limits always come along."""
    policy = policy_of(record)
    domains = policy.domains
    egress = (
        EgressRules(domains.allow, domains.block, domains.allowlist_only, secrets_of(record))
        if policy.network
        else None
    )
    return VMSpec(
        name=record.name,
        kernel=Path(record.extra["kernel"]),
        image=Path(record.extra["image_path"]),
        workdir=paths.data_dir() / "sandboxes" / record.name,
        rundir=Path(record.rundir),
        vcpus=record.vcpus,
        memory_mb=record.memory_mb,
        egress=egress,
        read_only=policy.read_only,
        max_procs=policy.max_procs,
        image_format=record.extra.get("image_format", "raw"),
        restore=Path(record.extra["restore_from"]) if record.extra.get("restore_from") else None,
        mounts=tuple(
            Mount(Path(m["host"]), m["guest"], m["read_only"]) for m in record.extra.get("mounts", [])
        ),
    )


def secrets_of(record: SandboxRecord) -> tuple[SecretBinding, ...]:
    """The secrets the sandbox's egress gateway brokers (placeholders and sources, no values)."""
    return tuple(SecretBinding.from_record(s) for s in record.extra.get("secrets") or ())


def policy_record(policy: Policy) -> dict[str, Any]:
    return asdict(policy)


def _mounts(policy: Policy, mount_dir: Path | None) -> list[dict[str, Any]]:
    """The host directories a sandbox sees: the project at /workspace, the home (read-only) at /mnt."""
    mounts = []
    if policy.mount_cwd or mount_dir is not None:
        source = (mount_dir or Path.cwd()).expanduser()
        if not source.is_dir():
            raise AgentkernelError(f"cannot mount {source}: no such directory")
        mounts.append({"host": str(source.resolve()), "guest": WORKSPACE, "read_only": False})
    if policy.mount_home:
        mounts.append({"host": str(Path.home().resolve()), "guest": "/mnt", "read_only": True})
    return mounts


def exec_env(record: SandboxRecord) -> dict[str, str]:
    """The environment every command in the sandbox starts from (what a command sets wins)."""
    policy = record.extra.get("policy", {})
    env: dict[str, str] = {}
    if policy.get("pass_env"):
        env.update({k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith("LC_")})
    if policy.get("network"):
        env.update(gateway.proxy_env())
    if bindings := secrets_of(record):
        env.update(gateway.trust_env())
        env.update(guest_env(bindings))
    return env


_held = threading.local()  # `names`: the sandboxes whose lock this thread holds


def _held_names() -> set[str]:
    names: set[str] | None = getattr(_held, "names", None)
    if names is None:
        names = _held.names = set()
    return names


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serializes life-cycle changes of one sandbox across processes."""
    with _lock(name, wait=True):
        yield


@contextlib.contextmanager
def _lock(name: str, *, wait: bool) -> Iterator[bool]:
    """The sandbox's lock. Without `wait` it yields False instead when another holds it, and True
    at once when this thread holds it already (a read under the lock, reconciling)."""
    validate_name(name)  # before the name becomes a path
    if not wait and name in _held_names():
        yield True
        return
    path = paths.private_dir(paths.data_dir() / "locks") / f"{name}.lock"
    with paths.open_private(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        _held_names().add(name)
        try:
            yield True
        finally:
            _held_names().discard(name)
            try:
                gone = not state.exists(name)
            except state.StateError:  # a full disk or a damaged database: the error is raised already
                gone = True
            if gone:  # removed, or never was: no lock file stays behind
                path.unlink(missing_ok=True)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def reconcile(record: SandboxRecord) -> SandboxRecord:
    """Bring a record's status in line with the VMM process it names (or, while it is starting,
    with the process starting it)."""
    if record.status == "starting":
        return _reconcile_start(record)
    if record.status != "running" or record.pid is None:
        return record
    backend = get_backend(record.backend)
    spec = spec_of(record)
    expired = time.time() >= record.extra.get("deadline", float("inf"))
    if backend.is_alive(spec, record.pid):
        if not expired:
            return record
        backend.kill(spec, record.pid)  # its watchdog should have done this already
    if expired:
        record.status, record.extra["stop_reason"] = "stopped", "lifetime exceeded"
        audit.record("expired", record.name)
    elif _powered_off(spec):
        record.status = "stopped"
    else:
        record.status, record.extra["stop_reason"] = "failed", exit_reason(spec.console_log)
    record.pid = None
    backend.cleanup(spec, keep_disk=True)
    state.update(record.name, status=record.status, pid=None, extra=record.extra)
    return record


def _reconcile_start(record: SandboxRecord) -> SandboxRecord:
    """A `starting` record whose starter has died: the start was interrupted, maybe after its VMM
    was spawned and before its pid was recorded. Whatever it started is killed (found by the run
    directory, see `Backend.kill`) and the sandbox is failed; `start` boots it again. Done under the
    sandbox's lock, checked again under it; while another process holds the lock the record is
    shown as it is."""
    starter = record.extra.get(STARTER)
    if isinstance(starter, dict) and owners.is_alive(starter):
        return record
    with _lock(record.name, wait=False) as mine:
        if not mine:
            return record
        try:
            current = state.get(record.name)
        except state.NoSuchSandboxError:
            return record
        if current.status != "starting" or current.extra.get(STARTER) != starter:
            return current  # finished, or started anew, meanwhile
        backend = get_backend(current.backend)
        spec = spec_of(current)
        backend.kill(spec, None)
        backend.cleanup(spec, keep_disk=True)
        current.status, current.pid = "failed", None
        current.extra = {**_without_starter(current.extra), "stop_reason": INTERRUPTED}
        state.update(current.name, status="failed", pid=None, extra=current.extra)
    audit.record("start", current.name, ok=False, reason=INTERRUPTED)
    return current


def _without_starter(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k != STARTER}


def _powered_off(spec: VMSpec) -> bool:
    tail = file_tail(spec.console_log)
    return any(marker in tail for marker in POWERED_OFF)


def get(name: str) -> SandboxRecord:
    return reconcile(state.get(validate_name(name)))


def list_sandboxes(*, pooled: bool = False) -> list[SandboxRecord]:
    """All sandboxes; those the pool daemon keeps ready (not yet anyone's) only with `pooled`.
    Sandboxes whose owner died are removed first."""
    reap()
    return [reconcile(r) for r in state.all_records() if pooled or not r.extra.get("pool")]


def reap() -> list[str]:
    """Remove every sandbox whose owner process has died (see `owners`); the names removed.

    Cheap when there is nothing to reap (one query, one /proc read per owned sandbox). Each removal
    holds the sandbox's lock and checks again under it, so two reapers, or a reaper and an owner that
    is removing its sandbox itself, never both act on one sandbox.
    """
    reaped = []
    for record in state.all_records():
        if owners.dead_owner(record.extra) is None:
            continue
        with contextlib.suppress(AgentkernelError), locked(record.name):
            if _reap_locked(record.name):
                reaped.append(record.name)
    return reaped


def _reap_locked(name: str) -> bool:
    try:
        record = state.get(name)
    except state.NoSuchSandboxError:
        return False  # removed meanwhile
    mark = owners.dead_owner(record.extra)
    if mark is None:
        return False  # adopted meanwhile
    if record.extra.get("pool"):  # a pool daemon's: a new daemon may yet adopt it
        since = mark.get("orphaned_at")
        if not isinstance(since, int | float):
            state.update(name, extra={**record.extra, owners.KEY: {**mark, "orphaned_at": time.time()}})
            return False
        if time.time() - since < owners.ADOPT_GRACE:
            return False
    _remove_locked(name, force=True)
    audit.record("reap", name, owner=mark)
    return True


def register(record: SandboxRecord, vmm: Backend, *, hold: str) -> None:
    """Record a new sandbox and make its disk; on any failure nothing of it is left."""
    with locked(record.name):
        state.insert(record)  # fails if the name is taken, before anything is made
        try:
            store.hold(hold, record.name)
            vmm.prepare(spec_of(record))
        except BaseException:
            vmm.cleanup(spec_of(record), keep_disk=False)
            store.release(record.name)
            state.delete(record.name)
            raise
    audit.record("create", record.name, image=record.image, backend=vmm.name, **record.extra)


def new_record(name: str, backend: str, **fields: Any) -> SandboxRecord:
    return SandboxRecord(
        name=name,
        backend=backend,
        status="stopped",
        pid=None,
        rundir=str(paths.runtime_dir() / secrets.token_hex(6)),
        created_at=now(),
        **fields,
    )


def create(
    name: str,
    *,
    image: str = "base",
    vcpus: int = DEFAULT_VCPUS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    profile: str = "moderate",
    backend: str | None = None,
    policy: Policy | None = None,
    mount_dir: Path | None = None,
    lifetime: float | None = None,
    pool: str | None = None,
    owned: bool = False,
    secrets: Sequence[SecretBinding] = (),
) -> SandboxRecord:
    """Make a sandbox (its own disk over the image); it is not started. With `owned` it is this
    process's, removed by the reaper once this process has died (see `owners`).

    `policy` defaults to the profile's; `mount_dir` is shared at /workspace (the current directory
    when the policy mounts it and none is given); `lifetime` stops the sandbox that many seconds after
    each start; `pool` marks it as kept ready by the pool daemon for that pool key; `secrets` (from
    `brokering.bind`) are brokered by its egress gateway. Without `backend`
    the host's best is chosen (hostinfo.choose_backend: a VM whenever a VMM can run here).
    """
    validate_name(name)
    reap()
    if policy is None:
        if profile not in PROFILES:
            raise AgentkernelError(f"unknown security profile {profile!r}: use {', '.join(PROFILES)}")
        policy = PROFILES[profile]
    if lifetime is not None and not 1 <= lifetime <= 30 * 86400:
        raise AgentkernelError(f"--lifetime must be between 1 second and 30 days (got {lifetime:g})")
    mounts = _mounts(policy, mount_dir)
    if secrets and not policy.network:
        raise AgentkernelError("secrets are used through the network: they need a profile with network")
    if not 1 <= vcpus <= 32:
        raise AgentkernelError(f"--vcpus must be between 1 and 32 (got {vcpus})")
    if not 64 <= memory_mb <= 65536:
        raise AgentkernelError(f"--memory must be between 64 and 65536 MB (got {memory_mb})")
    vmm = get_backend(hostinfo.choose_backend(backend, needs_network=policy.network), profile=policy.profile)
    img = store.get(image)
    vmlinux = kernel_artifact.current()
    if vmlinux is None:
        raise AgentkernelError("no guest kernel: run `agentkernel setup`")
    record = new_record(
        name,
        vmm.name,
        image=img.name,
        image_digest=img.digest,
        vcpus=vcpus,
        memory_mb=memory_mb,
        profile=policy.profile,
        extra={
            "kernel": str(vmlinux),
            "image_path": str(img.path),
            "policy": policy_record(policy),
            "mounts": mounts,
            "lifetime_s": lifetime,
            "pool": pool,
            owners.KEY: owners.current() if owned else None,
            "secrets": [binding.record() for binding in secrets],
        },
    )
    register(record, vmm, hold=img.name)
    return record


async def start(name: str, *, timeout: float = BOOT_TIMEOUT) -> SandboxRecord:
    """Boot the sandbox and wait until its agent answers."""
    async with _booted(name, timeout=timeout) as (record, _conn):
        return record


@contextlib.asynccontextmanager
async def _booted(name: str, *, timeout: float) -> AsyncIterator[tuple[SandboxRecord, Connection]]:
    """Boot the sandbox and keep the first agent connection open for the caller."""
    stack = contextlib.AsyncExitStack()
    with locked(name):
        record = get(name)
        if record.status in ("running", "starting"):
            raise AgentkernelError(f"sandbox '{name}' is already {record.status}")
        backend = get_backend(record.backend)
        spec = spec_of(record)
        diskspace.check_floor(spec.workdir)
        # Recorded before the VMM exists: should this process die before the VMM's pid is recorded,
        # `reconcile` sees its starter gone and kills what it started.
        state.update(name, status="starting", pid=None, extra={**record.extra, STARTER: owners.current()})
        try:
            pid = backend.start(spec)
        except BaseException:
            backend.kill(spec, None)
            backend.cleanup(spec, keep_disk=True)
            state.update(name, status=record.status, pid=None, extra=record.extra)
            raise
        extra = {**_without_starter(record.extra), "stop_reason": None}
        if lifetime := record.extra.get("lifetime_s"):
            extra["deadline"] = time.time() + lifetime
            _watchdog(spec, pid, lifetime)
        state.update(name, status="running", pid=pid, extra=extra)
        record.status, record.pid, record.extra = "running", pid, extra
        try:
            if spec.restore is not None:
                await cast(SnapshotBackend, backend).resume(spec, pid)
                extra["restore_from"] = None  # resumed once; later starts boot from its own disk
                state.update(name, extra=extra)
            conn = await stack.enter_async_context(_session(backend, spec, pid, timeout=timeout))
            for mount in spec.mounts:
                await _mount(conn, mount)
            if spec.egress is not None and not spec.read_only and spec.restore is None:
                await conn.write_file("/etc/resolv.conf", _chunks(gateway.RESOLV_CONF.encode()))
            if spec.egress is not None and spec.egress.secrets:
                await _trust_sandbox_ca(conn, spec)
            _configure(conn, record)  # from here on, what runs is the caller's: audited
        except BaseException:
            await stack.aclose()
            backend.kill(spec, pid)
            backend.cleanup(spec, keep_disk=True)
            state.update(name, status="failed", pid=None)
            audit.record("start", name, ok=False)
            raise
    audit.record("start", name, ok=True, pid=pid)
    async with stack:
        yield record, conn


async def _trust_sandbox_ca(conn: Connection, spec: VMSpec) -> None:
    """Make the guest trust the CA its gateway was just started with (for the secrets' hosts)."""
    script = gateway.trust_script(gateway.ca_cert_path(spec.rundir).read_text())
    done = await conn.run(["/bin/sh", "-c", script], limit=4096)
    if done.status.exit_code != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[:200]
        raise AgentkernelError(f"cannot install the sandbox CA in the guest: {detail}")


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _mount(conn: Connection, mount: Mount) -> None:
    options = "trans=virtio,version=9p2000.L,msize=262144" + (",ro" if mount.read_only else "")
    done = await conn.run(["mount", "-t", "9p", "-o", options, mount.tag, mount.guest], limit=4096)
    if done.status.exit_code != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[:200]
        raise AgentkernelError(f"cannot mount {mount.host} at {mount.guest} in the sandbox: {detail}")


def _configure(conn: Connection, record: SandboxRecord) -> None:
    """Every command gets the policy's environment, and every operation goes to the audit log."""
    conn.default_env = exec_env(record)
    conn.observer = lambda event, fields: audit.record(event, record.name, **fields)


def _watchdog(spec: VMSpec, pid: int, lifetime: float) -> None:
    """A detached `sleep` that kills the VMM when its lifetime is over, whoever is (not) watching."""
    script = 'sleep "$1"; grep -qF "$2" /proc/"$3"/cmdline 2>/dev/null && kill -KILL "$3"'
    subprocess.Popen(
        ["/bin/sh", "-c", script, "watchdog", str(int(lifetime) + 1), str(spec.rundir), str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.asynccontextmanager
async def ephemeral(
    *, name: str | None = None, keep: bool = False, pool: bool = True, **options: Any
) -> AsyncIterator[tuple[str, Connection]]:
    """A new sandbox (`options` as for `create`), booted, with a connection to its agent; removed
    afterwards unless `keep`. With `pool` (and no `name`), a ready one from the pool daemon is taken
    when it has one of this kind.

    Unless kept, the sandbox is this process's (see `owners`): if the process dies without removing
    it, the next reaper does."""
    stack = contextlib.AsyncExitStack()
    pooled = take_pooled(**options) if pool and name is None else None  # the daemon makes it ours
    if pooled is not None:
        if keep:
            set_owner(pooled, None)
        try:
            conn = await stack.enter_async_context(session(pooled, timeout=5.0))
        except AgentkernelError:
            remove(pooled, force=True)  # it died after it was handed out: boot a new one instead
            pooled = None
    name = pooled or (validate_name(name) if name else new_ephemeral_name())
    if pooled is None:
        create(name, owned=not keep, **options)  # leaves nothing behind when it fails
    try:
        if pooled is None:
            _record, conn = await stack.enter_async_context(_booted(name, timeout=BOOT_TIMEOUT))
        async with stack:
            yield name, conn
    finally:
        if not keep:
            remove(name, force=True)


WARM_UP = (
    ["true"],
    ["echo", "warm"],
    ["/bin/sh", "-c", "ls / >/dev/null; echo >&2"],
    ["cat", "/proc/uptime"],
)


async def warm_up(name: str) -> None:
    """Run a few small commands in a running sandbox, twice. The guest reads their programs into its
    page cache (a snapshot taken afterwards keeps it), and a new VMM under emulation translates the
    code they run: about 0.1 s that the first command run in it would otherwise pay."""
    async with session(name, timeout=30.0) as conn:
        for argv in WARM_UP * 2:
            done = await conn.run(argv, limit=1024)
            if done.status.exit_code != 0:
                raise AgentkernelError(f"warm-up command {argv[0]} failed in sandbox '{name}'")


def pool_key(*, image: str, backend: str | None, vcpus: int, memory_mb: int, policy: Policy) -> str | None:
    """The pool key of sandboxes made with these settings (None: no guest kernel yet). Sandboxes with
    equal keys are interchangeable: same image and kernel, backend, resources and policy. The
    Firecracker release is part of it where Firecracker may run them: a pool's template is a
    snapshot, which only the release that took it resumes, so an upgrade makes a new one."""
    vmlinux = kernel_artifact.current()
    if vmlinux is None:
        return None
    kind = {
        "image_digest": store.get(image).digest,
        "kernel": str(vmlinux),
        "backend": backend,
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "policy": policy_record(policy),
        "firecracker": firecracker_version.installed_version() if backend in (None, "firecracker") else None,
    }
    return hashlib.sha256(json.dumps(kind, sort_keys=True).encode()).hexdigest()[:16]


def take_pooled(
    *,
    image: str = "base",
    vcpus: int = DEFAULT_VCPUS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    profile: str = "moderate",
    backend: str | None = None,
    policy: Policy | None = None,
    mount_dir: Path | None = None,
    lifetime: float | None = None,
    secrets: Sequence[SecretBinding] = (),
) -> str | None:
    """A ready sandbox of this kind from the pool daemon, now the caller's; None if there is none.

    Sandboxes that share host directories, have a lifetime or secrets are never pooled.
    """
    policy = policy or PROFILES.get(profile)
    if policy is None or mount_dir is not None or policy.mount_cwd or policy.mount_home or lifetime:
        return None
    if secrets:
        return None
    if not wire.socket_path().exists():
        return None
    key = pool_key(image=image, backend=backend, vcpus=vcpus, memory_mb=memory_mb, policy=policy)
    name = wire.acquire(key) if key else None
    if name is not None:
        audit.record("pool_acquire", name)
    return name


async def stop(name: str, *, timeout: float = STOP_TIMEOUT) -> SandboxRecord:
    """Power the guest off cleanly (filesystems synced); kill the VMM if it does not exit in time."""
    with locked(name):
        record = get(name)
        backend = get_backend(record.backend)
        spec = spec_of(record)
        if record.status == "running" and record.pid is not None:
            await _shutdown(backend, spec, record.pid, timeout)
        backend.cleanup(spec, keep_disk=True)
        state.update(name, status="stopped", pid=None)
        record.status, record.pid = "stopped", None
    audit.record("stop", name)
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
    with locked(name):
        _remove_locked(name, force=force)
    audit.record("remove", name)


def _remove_locked(name: str, *, force: bool) -> None:
    record = get(name)
    backend = get_backend(record.backend)
    spec = spec_of(record)
    if record.status in ("running", "starting") and not force:
        raise AgentkernelError(f"sandbox '{name}' is {record.status}: stop it first or use --force")
    # Whatever the record says: no process of the sandbox outlives its files (see `Backend.kill`).
    backend.kill(spec, record.pid)
    backend.cleanup(spec, keep_disk=False)
    store.release(name)
    state.delete(name)


def set_owner(name: str, mark: owners.Owner | None) -> None:
    """Make the sandbox `mark`'s (None: nobody's, it persists), as one change under its lock."""
    with locked(name):
        record = state.get(name)
        state.update(name, extra={**record.extra, owners.KEY: mark})


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
        _configure(conn, record)
        yield conn


@contextlib.asynccontextmanager
async def _session(backend: Backend, spec: VMSpec, pid: int, *, timeout: float) -> AsyncIterator[Connection]:
    deadline = time.monotonic() + timeout
    async with _port_lock(spec, backend.agent_ports, deadline) as port:
        conn = await backend.connect(spec, pid, port=port, timeout=max(0.1, deadline - time.monotonic()))
        try:
            yield conn
        except AgentConnectionError:
            await _raise_if_ended(backend, spec, pid)
            raise
        finally:
            await conn.close()


async def _raise_if_ended(backend: Backend, spec: VMSpec, pid: int) -> None:
    """A lost agent connection is most often a VM that ended (its VMM closes the socket as it exits):
    if so, the error says that, and why."""
    deadline = time.monotonic() + VMM_EXIT_WAIT
    while backend.is_alive(spec, pid):
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)
    record = get(spec.name)
    reason = record.extra.get("stop_reason")
    raise AgentConnectionError(f"sandbox '{spec.name}' {record.status}" + (f": {reason}" if reason else ""))


@contextlib.asynccontextmanager
async def _port_lock(spec: VMSpec, ports: int, deadline: float) -> AsyncIterator[int]:
    """Take a free agent port of the sandbox (a host-side file lock per port), waiting for one."""
    while True:
        for port in range(ports):
            f = paths.open_private(spec.rundir / f"agent{port}.lock", "w")
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
