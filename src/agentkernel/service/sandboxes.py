"""Sandbox life cycle: create, start, stop, remove, list, and sessions to run commands in one.

The implementation behind `service.SandboxService`, private to this package: every face calls the
service, which checks input once (`request`, `checks`) and calls this. A sandbox's
record lives in SQLite; its VMM runs detached; any process reaches its agent through the sandbox's
sockets. Status is reconciled with reality on every read: a VMM that died shows as failed (or stopped,
when the guest powered itself off).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import math
import os
import secrets
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import anyio

from agentkernel import hostinfo, paths
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.backends import get_backend
from agentkernel.backends.base import (
    Backend,
    Mount,
    PausableBackend,
    SnapshotBackend,
    VMSpec,
    exit_reason,
    file_tail,
    vm_hello,
)
from agentkernel.backends.firecracker import version as firecracker_version
from agentkernel.backends.qemu.backend import agent_socket as qemu_agent_socket
from agentkernel.config import DEFAULT_MEMORY_MB, DEFAULT_VCPUS, PROFILES, Config, Policy, image_name
from agentkernel.detect import detect_image
from agentkernel.errors import (
    AgentConnectionError,
    AgentkernelError,
    NoSuchSandboxError,
    SandboxNotRunningError,
    SandboxStateError,
    StateError,
)
from agentkernel.images import store
from agentkernel.network import launcher as gateway
from agentkernel.network.brokering import SecretBinding, guest_env
from agentkernel.network.policy import EgressRules
from agentkernel.pool import wire
from agentkernel.protocol.connection import Connection
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit, diskspace, exec_file, observers, owners
from agentkernel.service.checks import validate_name

T = TypeVar("T")
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
VMM_EXIT_WAIT = 1.0
POWERED_OFF = (b"reboot: Restarting system", b"agentkernel-agent: shutting down")  # VM, container
WORKSPACE = "/workspace"
PASS_ENV = frozenset({"LANG", "LANGUAGE", "TZ", "TERM", "COLORTERM"})  # with pass_env, plus LC_*
INTERRUPTED = "its start was interrupted"


def spec_of(record: SandboxRecord) -> VMSpec:
    """The VM a record describes. Every path that starts, resumes or reaches a sandbox (create, start,
    fork, the pool, the API and MCP) gets its spec here, so the policy's limits always come along."""
    policy = record.effective_policy
    domains = policy.domains
    egress = (
        EgressRules(domains.allow, domains.block, domains.allowlist_only, secrets_of(record))
        if policy.network
        else None
    )
    return VMSpec(
        name=record.name,
        kernel=Path(record.kernel),
        image=Path(record.image_path),
        workdir=paths.data_dir() / "sandboxes" / record.name,
        rundir=Path(record.rundir),
        vcpus=record.vcpus,
        memory_mb=record.memory_mb,
        egress=egress,
        read_only=policy.read_only,
        max_procs=policy.max_procs,
        image_format=record.image_format,
        restore=Path(record.restore_from) if record.restore_from else None,
        mounts=tuple(Mount(Path(m.host), m.guest, m.read_only) for m in record.mounts),
    )


def secrets_of(record: SandboxRecord) -> tuple[SecretBinding, ...]:
    """The secrets the sandbox's egress gateway brokers (placeholders and sources, no values)."""
    return tuple(SecretBinding.from_record(s) for s in record.secrets)


def policy_record(policy: Policy) -> dict[str, Any]:
    return asdict(policy)


def _mounts(policy: Policy, mount_dir: Path | None) -> tuple[state.Mount, ...]:
    """The host directories a sandbox sees: the project at /workspace, the home (read-only) at /mnt."""
    mounts = []
    if policy.mount_cwd or mount_dir is not None:
        source = (mount_dir or Path.cwd()).expanduser()
        if not source.is_dir():
            raise AgentkernelError(f"cannot mount {source}: no such directory")
        mounts.append(state.Mount(str(source.resolve()), WORKSPACE, read_only=False))
    if policy.mount_home:
        mounts.append(state.Mount(str(Path.home().resolve()), "/mnt", read_only=True))
    return tuple(mounts)


def exec_env(record: SandboxRecord) -> dict[str, str]:
    """The environment every command in the sandbox starts from (what a command sets wins)."""
    names = _passed_names(record)
    passed = {k: v for k, v in os.environ.items() if k in names or k.startswith("LC_")} if names else {}
    return {**passed, **_sandbox_env(record)}


def _passed_names(record: SandboxRecord) -> frozenset[str] | None:
    """The variables a command takes from the caller's environment (with every LC_*), or None."""
    return PASS_ENV if record.effective_policy.pass_env else None


def _sandbox_env(record: SandboxRecord) -> dict[str, str]:
    """What the sandbox itself sets in every command's environment, over what the caller passes."""
    env: dict[str, str] = {}
    if record.effective_policy.network:
        env.update(gateway.proxy_env())
    if bindings := secrets_of(record):
        env.update(gateway.trust_env())
        env.update(guest_env(bindings))
    env.update(record.env)
    return env


def _command_proxy_env(record: SandboxRecord, command: str) -> dict[str, str]:
    """One command's proxy variables, carrying its id (those the sandbox's own env sets stay its)."""
    return {k: v for k, v in gateway.proxy_env(command).items() if k not in record.env}


def _write_exec_file(record: SandboxRecord, spec: VMSpec, pid: int) -> None:
    """The file the thin command line runs commands in this sandbox by (`exec_file`): QEMU's only, whose
    agent sockets speak the protocol from the first byte. Not written (a full disk, a run directory
    being removed), the thin command line leaves the sandbox to the full one."""
    if record.backend != "qemu":
        return
    sockets = [qemu_agent_socket(spec, port) for port in range(get_backend(record.backend).agent_ports)]
    network = record.effective_policy.network
    with contextlib.suppress(OSError):
        exec_file.write(
            spec.rundir,
            pid=pid,
            sockets=sockets,
            hello=vm_hello(spec),
            passed=_passed_names(record),
            env=_sandbox_env(record),
            command_env=_command_proxy_env(record, exec_file.COMMAND_MARK) if network else {},
        )


_held = threading.local()  # `names`: the sandboxes whose lock this thread holds


def _held_names() -> set[str]:
    names: set[str] | None = getattr(_held, "names", None)
    if names is None:
        names = _held.names = set()
    return names


class Flock:
    """A sandbox's lock, which serializes life-cycle changes of one sandbox across processes.

    Taken in one thread and released in any: an async operation takes it in a worker thread, awaits
    the guest with it held, and releases it. Code that reads the record under it runs `held_here`, so
    `reconcile` knows the lock is this thread's."""

    def __init__(self, name: str) -> None:
        self.name = validate_name(name)  # before the name becomes a path
        self.path = paths.private_dir(paths.data_dir() / "locks") / f"{name}.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        f = paths.open_private(self.path, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except BaseException:
            f.close()
            raise
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        try:
            try:
                gone = not state.exists(self.name)
            except StateError:  # a full disk or a damaged database: the error is raised already
                gone = True
            if gone:  # removed, or never was: no lock file stays behind
                self.path.unlink(missing_ok=True)
        finally:
            self._file.close()
            self._file = None

    @contextlib.contextmanager
    def held_here(self) -> Iterator[None]:
        _held_names().add(self.name)
        try:
            yield
        finally:
            _held_names().discard(self.name)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """The sandbox's lock, for blocking code in this thread."""
    lock = Flock(name)
    lock.acquire()
    try:
        with lock.held_here():
            yield
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def locked_async(name: str) -> AsyncIterator[Flock]:
    """The sandbox's lock for an async operation: waited for in a worker thread, held across awaits."""
    lock = Flock(name)
    await finished_in_thread(lock.acquire, undo=lambda _none: lock.release())
    try:
        yield lock
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lock.release)


async def finished_in_thread(func: Callable[[], T], *, undo: Callable[[T], None]) -> T:
    """`func()` in a worker thread, never abandoned: a caller cancelled meanwhile (by anyio or by
    asyncio) waits for it to finish, has `undo` run on what it did (in a thread), and is then cancelled.
    For what must not be lost: a lock taken, a VMM spawned."""
    work = asyncio.ensure_future(anyio.to_thread.run_sync(func))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            await asyncio.wait([work])
            if not work.cancelled() and work.exception() is None:
                await anyio.to_thread.run_sync(undo, work.result())
        raise


@contextlib.contextmanager
def _try_lock(name: str) -> Iterator[bool]:
    """The sandbox's lock if it is free (True), else False at once; True at once when this thread
    holds it already (a read under the lock, reconciling)."""
    if name in _held_names():
        yield True
        return
    lock = Flock(name)
    f = paths.open_private(lock.path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        yield False
        return
    lock._file = f
    try:
        with lock.held_here():
            yield True
    finally:
        lock.release()


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def reconcile(record: SandboxRecord) -> SandboxRecord:
    """Bring a record's status in line with the VMM process it names (or, while it is starting,
    with the process starting it). A paused sandbox's VMM is running too, its vCPUs stopped."""
    if record.status == "starting":
        return _reconcile_start(record)
    if record.status not in ("running", "paused") or record.pid is None:
        return record
    backend = get_backend(record.backend)
    spec = spec_of(record)
    expired = record.deadline is not None and time.time() >= record.deadline
    if backend.is_alive(spec, record.pid):
        if not expired:
            return record
        backend.kill(spec, record.pid)  # its watchdog should have done this already
    if expired:
        record.status, record.stop_reason = "stopped", "lifetime exceeded"
        audit.record("expired", record.name)
    elif _powered_off(spec):
        record.status = "stopped"
    else:
        record.status, record.stop_reason = "failed", exit_reason(spec.console_log)
    record.pid = None
    backend.cleanup(spec, keep_disk=True)
    state.update(record.name, status=record.status, pid=None, stop_reason=record.stop_reason)
    return record


def _reconcile_start(record: SandboxRecord) -> SandboxRecord:
    """A `starting` record whose starter has died: the start was interrupted, maybe after its VMM
    was spawned and before its pid was recorded. Whatever it started is killed (found by the run
    directory, see `Backend.kill`) and the sandbox is failed; `start` boots it again. Done under the
    sandbox's lock, checked again under it; while another process holds the lock the record is
    shown as it is."""
    starter = record.starter
    if starter is not None and owners.is_alive(starter):
        return record
    with _try_lock(record.name) as mine:
        if not mine:
            return record
        try:
            current = state.get(record.name)
        except NoSuchSandboxError:
            return record
        if current.status != "starting" or current.starter != starter:
            return current  # finished, or started anew, meanwhile
        backend = get_backend(current.backend)
        spec = spec_of(current)
        backend.kill(spec, None)
        backend.cleanup(spec, keep_disk=True)
        current.status, current.pid = "failed", None
        current.starter, current.stop_reason = None, INTERRUPTED
        state.update(current.name, status="failed", pid=None, starter=None, stop_reason=INTERRUPTED)
    audit.record("start", current.name, ok=False, reason=INTERRUPTED)
    return current


def _powered_off(spec: VMSpec) -> bool:
    tail = file_tail(spec.console_log)
    return any(marker in tail for marker in POWERED_OFF)


def get(name: str) -> SandboxRecord:
    return reconcile(state.get(validate_name(name)))


def running_with_network() -> list[tuple[str, EgressRules, Path, int]]:
    """The name, egress rules, run directory and VMM pid of each sandbox whose VMM runs with network
    on: what a restarted egress gateway registers again, and watches (`launcher`). Read without the
    sandboxes' locks (a start holds one): a stop kills the VMM before it withdraws, under the
    gateway's lock."""
    found = []
    for record in state.all_records():
        if record.status not in ("running", "paused") or record.pid is None:
            continue
        spec = spec_of(record)
        with contextlib.suppress(AgentkernelError):  # a backend this host cannot run any more
            if spec.egress is not None and get_backend(record.backend).is_alive(spec, record.pid):
                found.append((spec.name, spec.egress, spec.rundir, record.pid))
    return found


def list_sandboxes(*, pooled: bool = False) -> list[SandboxRecord]:
    """All sandboxes; those the pool daemon keeps ready (not yet anyone's) only with `pooled`.
    Sandboxes whose owner died are removed first."""
    reap()
    return [reconcile(r) for r in state.all_records() if pooled or not r.pool]


def reap() -> list[str]:
    """Remove every sandbox whose owner process has died (see `owners`); the names removed.

    Cheap when there is nothing to reap (one query, one /proc read per owned sandbox). Each removal
    holds the sandbox's lock and checks again under it, so two reapers, or a reaper and an owner that
    is removing its sandbox itself, never both act on one sandbox.
    """
    reaped = []
    for record in state.all_records():
        if owners.dead_owner(record.owner) is None:
            continue
        with contextlib.suppress(AgentkernelError), locked(record.name):
            if _reap_locked(record.name):
                reaped.append(record.name)
    return reaped


def _reap_locked(name: str) -> bool:
    try:
        record = state.get(name)
    except NoSuchSandboxError:
        return False  # removed meanwhile
    mark = owners.dead_owner(record.owner)
    if mark is None:
        return False  # adopted meanwhile
    if record.pool:  # a pool daemon's: a new daemon may yet adopt it
        since = mark.get("orphaned_at")
        if not isinstance(since, int | float):
            state.update(name, owner={**mark, "orphaned_at": time.time()})
            return False
        if time.time() - since < owners.ADOPT_GRACE:
            return False
    _remove_locked(name, force=True)
    audit.record("reap", name, owner=mark)
    return True


def register(record: SandboxRecord, vmm: Backend, *, hold: str, disk_mb: int | None = None) -> None:
    """Record a new sandbox and make its disk (of `disk_mb` MiB; None: the image's size); on any
    failure nothing of it is left."""
    with locked(record.name):
        state.insert(record)  # fails if the name is taken, before anything is made
        try:
            store.hold(hold, record.name)
            vmm.prepare(replace(spec_of(record), disk_mb=disk_mb))
        except BaseException:
            vmm.cleanup(spec_of(record), keep_disk=False)
            store.release(record.name)
            state.delete(record.name)
            raise
    audit.record("create", record.name, image=record.image, backend=vmm.name, **state.extra_of(record))


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
    disk_mb: int | None = None,
    profile: str = "moderate",
    backend: str | None = None,
    policy: Policy | None = None,
    mount_dir: Path | None = None,
    lifetime: float | None = None,
    pool: str | None = None,
    owned: bool = False,
    secrets: Sequence[SecretBinding] = (),
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> SandboxRecord:
    """Make a sandbox (its own disk over the image); it is not started. With `owned` it is this
    process's, removed by the reaper once this process has died (see `owners`).

    The settings come checked from `request.resolve` (the service's callers) or a test's hand.
    `policy` defaults to the profile's; `mount_dir` is shared at /workspace (the current directory
    when the policy mounts it and none is given); `lifetime` stops the sandbox that many seconds after
    each start; `pool` marks it as kept ready by the pool daemon for that pool key; `secrets` (from
    `brokering.bind`) are brokered by its egress gateway; `env` is set for every command run in it
    (below what a command sets); `labels` are kept to find it by; `disk_mb` sizes its writable disk
    (None: its image's size). Without `backend` the host's best
    is chosen (hostinfo.choose_backend: a VM whenever a VMM can run here).
    """
    validate_name(name)
    reap()
    policy = policy or PROFILES[profile]
    mounts = _mounts(policy, mount_dir)
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
        kernel=str(vmlinux),
        image_path=str(img.path),
        policy=policy,
        mounts=mounts,
        lifetime_s=lifetime,
        pool=pool,
        owner=owners.current() if owned else None,
        secrets=tuple(binding.record() for binding in secrets),
        env=dict(env or {}),
        labels=dict(labels or {}),
    )
    register(record, vmm, hold=img.name, disk_mb=disk_mb)
    return record


async def start(name: str, *, timeout: float = BOOT_TIMEOUT) -> SandboxRecord:
    """Boot the sandbox and wait until its agent answers."""
    async with _booted(name, timeout=timeout) as (record, _conn):
        return record


@dataclass
class _Boot:
    """A boot under way: its VMM spawned, its record running, the guest not yet reached."""

    record: SandboxRecord
    backend: Backend
    spec: VMSpec
    pid: int


def _spawn(name: str, lock: Flock) -> _Boot:
    """The blocking half of a start, run in a worker thread with the sandbox's lock held: check the
    record, spawn the VMM, record it running."""
    with lock.held_here():
        record = get(name)
    if record.status in ("running", "starting", "paused"):
        raise SandboxStateError(f"sandbox '{name}' is already {record.status}")
    backend = get_backend(record.backend)
    spec = spec_of(record)
    diskspace.check_floor(spec.workdir)
    # Recorded before the VMM exists: should this process die before the VMM's pid is recorded,
    # `reconcile` sees its starter gone and kills what it started.
    state.update(name, status="starting", pid=None, starter=owners.current())
    try:
        pid = backend.start(spec)
    except BaseException:
        backend.kill(spec, None)
        backend.cleanup(spec, keep_disk=True)
        state.update(name, status=record.status, pid=None, starter=None)
        raise
    deadline = None
    if lifetime := record.lifetime_s:
        deadline = time.time() + lifetime
        arm_watchdog(spec, pid, deadline)
    state.update(name, status="running", pid=pid, starter=None, stop_reason=None, deadline=deadline)
    record.status, record.pid, record.stop_reason, record.deadline = "running", pid, None, deadline
    return _Boot(record, backend, spec, pid)


def _abort(boot: _Boot) -> None:
    """A boot that failed or was cancelled after its VMM was spawned: the VMM is killed."""
    boot.backend.kill(boot.spec, boot.pid)
    boot.backend.cleanup(boot.spec, keep_disk=True)
    state.update(boot.record.name, status="failed", pid=None)
    audit.record("start", boot.record.name, ok=False)


@contextlib.asynccontextmanager
async def _booted(name: str, *, timeout: float) -> AsyncIterator[tuple[SandboxRecord, Connection]]:
    """Boot the sandbox and keep the first agent connection open for the caller.

    The blocking parts (the lock, spawning the VMM, killing it) run in worker threads, the guest is
    awaited on the caller's loop. A boot cancelled at any point kills its VMM: a cancellation that
    comes while the VMM is being spawned waits for it to be spawned, and kills it."""
    stack = contextlib.AsyncExitStack()
    began = time.monotonic()
    async with locked_async(name) as lock:
        boot = await finished_in_thread(functools.partial(_spawn, name, lock), undo=_abort)
        record, backend, spec = boot.record, boot.backend, boot.spec
        mode: observers.StartMode = "cold" if spec.restore is None else "restore"
        try:
            if spec.restore is not None:
                await cast(SnapshotBackend, backend).resume(spec, boot.pid)
                record.restore_from = None  # resumed once; later starts boot from its own disk
                await anyio.to_thread.run_sync(functools.partial(state.update, name, restore_from=None))
            conn = await stack.enter_async_context(_session(backend, spec, boot.pid, timeout=timeout))
            for mount in spec.mounts:
                await _mount(conn, mount)
            if spec.egress is not None and not spec.read_only and spec.restore is None:
                await conn.write_file("/etc/resolv.conf", _chunks(gateway.RESOLV_CONF.encode()))
            if spec.egress is not None and spec.egress.secrets:
                await _trust_sandbox_ca(conn, spec)
            _configure(conn, record)  # from here on, what runs is the caller's: audited
            _write_exec_file(record, spec, boot.pid)
        except BaseException:
            observers.start_failed(mode)
            with anyio.CancelScope(shield=True):
                await stack.aclose()
                await anyio.to_thread.run_sync(_abort, boot)
            raise
    observers.started(mode, time.monotonic() - began)
    audit.record("start", name, ok=True, pid=boot.pid)
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
    if record.effective_policy.network:
        conn.command_env = functools.partial(_command_proxy_env, record)

    def observe(event: str, fields: dict[str, Any]) -> None:
        audit.record(event, record.name, **fields)
        observers.operation(event, fields)

    conn.observer = observe


def deadline_file(spec: VMSpec) -> Path:
    """Where the running sandbox's deadline is kept for its watchdogs (whole seconds since the epoch);
    no file: it has no lifetime."""
    return spec.rundir / "deadline"


def set_deadline(spec: VMSpec, deadline: float | None) -> None:
    """Write (or, with None, remove) the deadline the sandbox's watchdogs read."""
    path = deadline_file(spec)
    if deadline is None:
        path.unlink(missing_ok=True)
        return
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with paths.open_private(scratch, "w") as f:
        f.write(f"{math.ceil(deadline)}\n")
    scratch.replace(path)  # a watchdog reads the old deadline or the new one, never half of it


# Sleeps until the deadline in file $1, reading it again on waking (it may have been moved later),
# and kills VMM $3 (if it still is the sandbox's: its command line names run directory $2) once the
# deadline has passed; ends quietly if the file is gone (the lifetime was removed, or the sandbox
# stopped).
WATCHDOG = """
while d=$(cat "$1" 2>/dev/null) && n=$(date +%s) && [ "$n" -lt "$d" ]; do sleep $((d - n)); done
[ -f "$1" ] && grep -qF "$2" /proc/"$3"/cmdline 2>/dev/null && kill -KILL "$3"
"""


def arm_watchdog(spec: VMSpec, pid: int, deadline: float) -> None:
    """Set the sandbox's deadline, and start a detached watchdog that kills the VMM once it has
    passed, whoever is (not) watching. A deadline moved later needs no new watchdog (the running one
    reads it again when it wakes); one moved earlier does, as the running one sleeps past it."""
    set_deadline(spec, deadline)
    subprocess.Popen(
        ["/bin/sh", "-c", WATCHDOG, "watchdog", str(deadline_file(spec)), str(spec.rundir), str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


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
    disk_mb: int | None = None,
) -> str | None:
    """A ready sandbox of this kind from the pool daemon, now the caller's; None if there is none.

    Sandboxes that share host directories, have a lifetime, secrets or a disk size are never pooled.
    """
    policy = policy or PROFILES.get(profile)
    if policy is None or mount_dir is not None or policy.mount_cwd or policy.mount_home or lifetime:
        return None
    if secrets or disk_mb is not None:
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
    async with locked_async(name) as lock:

        def current() -> SandboxRecord:
            with lock.held_here():
                return get(name)

        record = await anyio.to_thread.run_sync(current)
        backend = get_backend(record.backend)
        spec = spec_of(record)
        if record.status == "paused" and record.pid is not None:  # runs on to power off cleanly
            await cast(PausableBackend, backend).unpause(spec, record.pid)
            record.status = "running"
        if record.status == "running" and record.pid is not None:
            await _shutdown(backend, spec, record.pid, timeout)

        def stopped() -> None:
            backend.cleanup(spec, keep_disk=True)
            state.update(name, status="stopped", pid=None)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stopped)
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
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(backend.kill, spec, pid)


def remove(name: str, *, force: bool = False) -> None:
    """Delete a sandbox and everything it has on disk. A running one needs `force`."""
    with locked(name):
        _remove_locked(name, force=force)
    audit.record("remove", name)


def remove_owned(name: str, owner: owners.Owner) -> None:
    """Remove sandbox `name` (running or not) if `owner` owns it, checked under its lock; else
    SandboxStateError."""
    with locked(name):
        if get(name).owner != owner:
            raise SandboxStateError(f"sandbox '{name}' is not the asking process's")
        _remove_locked(name, force=True)
    audit.record("remove", name)


def _remove_locked(name: str, *, force: bool) -> None:
    record = get(name)
    backend = get_backend(record.backend)
    spec = spec_of(record)
    if record.status in ("running", "starting", "paused") and not force:
        raise SandboxStateError(f"sandbox '{name}' is {record.status}: stop it first or remove it with force")
    # Whatever the record says: no process of the sandbox outlives its files (see `Backend.kill`).
    backend.kill(spec, record.pid)
    backend.cleanup(spec, keep_disk=False)
    store.release(name)
    state.delete(name)


def set_owner(name: str, mark: owners.Owner | None) -> None:
    """Make the sandbox `mark`'s (None: nobody's, it persists), as one change under its lock."""
    with locked(name):
        state.get(name)  # NoSuchSandboxError when it is gone
        state.update(name, owner=mark)


@contextlib.asynccontextmanager
async def session(name: str, *, timeout: float = 30.0) -> AsyncIterator[Connection]:
    """A connection to a running sandbox's agent, on a port no other process is using."""
    record = await anyio.to_thread.run_sync(get, name)
    if record.status != "running" or record.pid is None:
        raise SandboxNotRunningError(name, record.status)
    spec = spec_of(record)
    async with _session(get_backend(record.backend), spec, record.pid, timeout=timeout) as conn:
        _configure(conn, record)
        _write_exec_file(record, spec, record.pid)
        yield conn


@contextlib.asynccontextmanager
async def _session(backend: Backend, spec: VMSpec, pid: int, *, timeout: float) -> AsyncIterator[Connection]:
    deadline = time.monotonic() + timeout
    async with _port_lock(spec, backend.agent_ports, deadline) as port:
        conn = await backend.connect(spec, pid, port=port, timeout=max(0.1, deadline - time.monotonic()))
        conn.explain = functools.partial(_explain_loss, backend, spec, pid)
        try:
            yield conn
        finally:
            await conn.close()


async def _explain_loss(
    backend: Backend, spec: VMSpec, pid: int, error: AgentConnectionError
) -> AgentConnectionError:
    return await anyio.to_thread.run_sync(functools.partial(_loss, backend, spec, pid, error))


def explained_loss(name: str, pid: int, error: AgentConnectionError) -> AgentConnectionError:
    """`error`, a lost connection to sandbox `name` whose VMM was `pid`, as the service words it."""
    record = state.get(name)
    return _loss(get_backend(record.backend), spec_of(record), pid, error)


def _loss(backend: Backend, spec: VMSpec, pid: int, error: AgentConnectionError) -> AgentConnectionError:
    """A lost agent connection is most often a VM that ended (its VMM closes the socket as it exits):
    if it ends within a moment, an error that says so, and why; else `error`."""
    deadline = time.monotonic() + VMM_EXIT_WAIT
    while backend.is_alive(spec, pid):
        if time.monotonic() > deadline:
            return error
        time.sleep(0.02)
    record = get(spec.name)
    reason = record.stop_reason
    return AgentConnectionError(f"sandbox '{spec.name}' {record.status}" + (f": {reason}" if reason else ""))


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
