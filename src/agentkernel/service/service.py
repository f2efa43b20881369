"""The sandbox service: the one door the CLI, the HTTP API, the MCP server, the pool daemon, bench and
stress all go through.

A new sandbox's settings arrive as `SandboxFlags` and are resolved once (`request.resolve`: flags,
then agentkernel.toml, then the defaults) into a checked `SandboxRequest`; other input is checked by
`checks`, once for every caller: errors name the field they are about. State checks happen inside the
locked operation that acts on them, raising typed errors (`errors.py`), so no caller looks before it
leaps. `sandboxes` and `snapshots` are the implementation behind it, private to this package.

Blocking work (the sandbox's file lock, qemu-img, spawning and killing a VMM, the state database)
runs in worker threads; the guest is awaited on the caller's loop, and a cancelled request still waits
for its thread, so cleanup never races it. Commands and file operations share one agent connection per
sandbox (ConnectionPool).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio

from agentkernel import hostinfo
from agentkernel.backends.base import VMSpec
from agentkernel.errors import (
    AgentkernelError,
    InvalidRequestError,
    NoSuchSandboxError,
    NotAFileError,
    SandboxNotRunningError,
)
from agentkernel.protocol.connection import (
    Attachment,
    BackgroundCommand,
    BackgroundInfo,
    Connection,
    ExitStatus,
    FileInfo,
    Process,
    Watch,
)
from agentkernel.protocol.requests import check_arguments
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import commands, files, lifetimes, observers, owners, ports, sandboxes, snapshots
from agentkernel.service.checks import (
    check_command,
    check_env,
    check_lifetime,
    check_timeout,
    guest_path,
    validate_name,
)
from agentkernel.service.connections import ConnectionPool
from agentkernel.service.lifetimes import AS_SAVED, ForkLifetime
from agentkernel.service.request import DEFAULTS, SandboxFlags, SandboxRequest, resolve_in
from agentkernel.service.snapshots import Snapshot

log = logging.getLogger("agentkernel.service")
T = TypeVar("T")


def call(work: Callable[[SandboxService], Awaitable[T]], *, project_dir: Path | None = None) -> T:
    """`work` done with a service on a new event loop, for synchronous callers (the CLI, and the pool
    daemon, bench and stress in threads of their own); `project_dir`: the current directory."""

    async def go() -> T:
        async with SandboxService(project_dir or Path.cwd()) as service:
            return await work(service)

    return asyncio.run(go())


class SandboxService:
    """The service for one event loop. `project_dir` is where agentkernel.toml is looked up (and the
    directory a policy that mounts the project shares). Close it (or use it as an async context
    manager) before its loop ends."""

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = project_dir
        self.pool = ConnectionPool()
        self.ephemerals: set[str] = set()  # made for one request, not yet removed

    async def __aenter__(self) -> SandboxService:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    async def close(self) -> None:
        """Close connections, and remove the sandboxes of requests still running: a stopping server
        cancels them, and the cancellation may not leave their own cleanup time to finish."""
        await self.pool.close()
        for name in list(self.ephemerals):
            await self._remove_ephemeral(name)

    # -- settings -----------------------------------------------------------------------------

    async def resolve(
        self, flags: SandboxFlags, *, command: Sequence[str] = (), defaults: tuple[int, int] = DEFAULTS
    ) -> SandboxRequest:
        """The request for `flags` in this service's project (see `request.resolve`)."""
        return await anyio.to_thread.run_sync(
            functools.partial(resolve_in, flags, self.project_dir, command=command, defaults=defaults)
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def list_sandboxes(
        self, *, labels: Mapping[str, str] | None = None, pooled: bool = False
    ) -> list[SandboxRecord]:
        """Every sandbox (the pool daemon's ready ones only with `pooled`), those with all of
        `labels` when given."""
        found = await anyio.to_thread.run_sync(functools.partial(sandboxes.list_sandboxes, pooled=pooled))
        wanted = dict(labels or {})
        return [r for r in found if wanted.items() <= r.labels.items()]

    async def get(self, name: str) -> SandboxRecord:
        return await anyio.to_thread.run_sync(sandboxes.get, validate_name(name))

    async def create(
        self,
        request: SandboxRequest,
        *,
        name: str | None = None,
        start: bool = True,
        owned: bool = False,
        pool: str | None = None,
    ) -> SandboxRecord:
        """Create a sandbox; with `start`, boot it too (and remove it again if it does not boot).
        With `owned` it is this process's: removed by a reaper once this process has died. `pool`
        marks it as a pool daemon's ready sandbox of that kind."""
        name = validate_name(name) if name else f"sandbox-{secrets.token_hex(4)}"
        record = await anyio.to_thread.run_sync(
            functools.partial(_create, name, request, owned=owned, pool=pool)
        )
        if not start:
            return record
        try:
            return await sandboxes.start(name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=True))
            raise

    async def start(self, name: str) -> SandboxRecord:
        """Boot a sandbox; refused (SandboxStateError) when it is running or starting already."""
        return await sandboxes.start(validate_name(name))

    async def stop(self, name: str) -> SandboxRecord:
        name = validate_name(name)
        await self.pool.discard(name)
        return await sandboxes.stop(name)

    async def remove(self, name: str, *, force: bool = False) -> None:
        """Remove a sandbox; a running one only with `force` (else SandboxStateError)."""
        name = validate_name(name)
        await self.pool.discard(name)
        await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=force))

    async def reap(self) -> list[str]:
        """Remove the sandboxes whose owner died; their names."""
        return await anyio.to_thread.run_sync(sandboxes.reap)

    async def warm_up(self, name: str) -> None:
        await sandboxes.warm_up(validate_name(name))

    async def ping(self, name: str, *, timeout: float = 5.0) -> None:
        """Reach the sandbox's agent on a connection of its own (not the shared one)."""
        async with sandboxes.session(validate_name(name), timeout=timeout) as conn:
            await conn.ping()

    @staticmethod
    def new_name() -> str:
        """A name for a sandbox made for one use (`run-XXXXXXXX`)."""
        return sandboxes.new_ephemeral_name()

    async def console_log(self, name: str) -> Path:
        """Where the sandbox's console (its kernel's and agent's messages) is written."""
        return (await self.vm_spec(name)).console_log

    async def vm_spec(self, name: str) -> VMSpec:
        """The VM the sandbox is (its files on the host: run directory, disk, console log)."""
        return sandboxes.spec_of(await self.get(name))

    async def take_pooled(self, request: SandboxRequest) -> str | None:
        """A ready sandbox of the pool daemon of `request`'s kind, now this process's; None if it
        has none."""
        made: list[str] = []
        return made[0] if await anyio.to_thread.run_sync(_take_pooled, request, made, False) else None

    @contextlib.asynccontextmanager
    async def ephemeral(
        self,
        request: SandboxRequest,
        *,
        name: str | None = None,
        keep: bool = False,
        pool: bool = True,
    ) -> AsyncIterator[tuple[str, Connection]]:
        """A new running sandbox and a connection to its agent, removed afterwards (also when the caller
        is cancelled: a client that went away, an MCP request cancelled) unless `keep`. With `pool`
        (and no `name`) a ready one from the pool daemon is taken when it has one of this kind.

        Unless kept, the sandbox is this process's (see `owners`): should the process die first, a
        reaper removes it.
        """
        name = validate_name(name) if name else None
        made: list[str] = []  # filled in the worker thread: a wait cancelled after it still knows
        began = time.monotonic()
        try:
            pooled = False
            if pool and name is None and request.poolable:
                pooled = await anyio.to_thread.run_sync(_take_pooled, request, made, keep)
            if pooled:
                self.ephemerals.add(made[0])
                try:
                    conn = await self.pool.get(made[0])
                    observers.started("pool", time.monotonic() - began)
                except AgentkernelError:  # it died after it was handed out: boot a new one instead
                    await self._remove_ephemeral(made.pop())
                    pooled = False
            if not pooled:
                new = name or sandboxes.new_ephemeral_name()
                await anyio.to_thread.run_sync(
                    functools.partial(_create, new, request, owned=not keep, made=made)
                )
                self.ephemerals.add(new)
                await sandboxes.start(new)
                conn = await self.pool.get(new)
            yield made[0], conn
        finally:
            if made:
                if keep:
                    self.ephemerals.discard(made[0])
                else:
                    with anyio.CancelScope(shield=True):
                        await self._remove_ephemeral(made[0])

    async def _remove_ephemeral(self, name: str) -> None:
        await self.pool.discard(name)
        with contextlib.suppress(NoSuchSandboxError):  # removed already (by close, or a reaper)
            await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=True))
        self.ephemerals.discard(name)

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, sandbox: str, name: str) -> Snapshot:
        """Save running `sandbox` as snapshot `name`; the sandbox runs on."""
        return await snapshots.create(validate_name(sandbox, field="sandbox"), validate_name(name))

    async def fork(
        self,
        snapshot: str,
        name: str | None,
        *,
        lifetime: ForkLifetime = AS_SAVED,
        pool: str | None = None,
        owned: bool = False,
    ) -> SandboxRecord:
        """A new running sandbox `name` (default: sandbox-XXXXXXXX) resumed from `snapshot`, ended
        `lifetime` seconds after each start (None: when stopped; default: as the snapshot's sandbox
        was; `pool`, `owned`: as for the pool's)."""
        name = validate_name(name) if name else f"sandbox-{secrets.token_hex(4)}"
        if not isinstance(lifetime, str) and lifetime is not None:
            lifetime = check_lifetime(lifetime, field="timeout")
        return await snapshots.fork(
            validate_name(snapshot, field="snapshot"), name, lifetime_s=lifetime, pool=pool, owned=owned
        )

    async def template(
        self, name: str, *, source: str, request: SandboxRequest, pool: str | None = None
    ) -> Snapshot:
        """Snapshot `name` of a new sandbox `source` made from `request`, booted and warmed up so forks
        start with its page cache; `source` is removed afterwards (owned meanwhile)."""
        await anyio.to_thread.run_sync(functools.partial(_create, source, request, owned=True, pool=pool))
        try:
            await sandboxes.start(source)
            await sandboxes.warm_up(source)
            return await snapshots.create(source, name)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, source, force=True))

    async def list_snapshots(self) -> list[Snapshot]:
        return await anyio.to_thread.run_sync(snapshots.list_snapshots)

    async def get_snapshot(self, name: str) -> Snapshot:
        return await anyio.to_thread.run_sync(snapshots.get, validate_name(name))

    async def remove_snapshot(self, name: str) -> None:
        await anyio.to_thread.run_sync(snapshots.remove, validate_name(name))

    async def discard_partial_snapshots(self) -> list[str]:
        """Remove what makers of snapshots that died left half-written; the snapshots' names."""
        return await anyio.to_thread.run_sync(snapshots.discard_partial)

    # -- lifetimes, pause and resume (lifetimes.py) ----------------------------------------------

    async def set_timeout(self, name: str, seconds: float | None) -> SandboxRecord:
        """End a running (or paused) sandbox `seconds` from now (None or 0: when it is stopped)."""
        lifetime = check_lifetime(seconds, field="timeout") if seconds else None
        return await lifetimes.set_timeout(validate_name(name), lifetime)

    async def pause(self, name: str) -> SandboxRecord:
        """Stop a running sandbox's vCPUs, its memory kept; commands and files wait for `resume`."""
        name = validate_name(name)
        await self.pool.discard(name)  # its agent cannot answer meanwhile
        return await lifetimes.pause(name)

    async def resume(self, name: str) -> SandboxRecord:
        """Let a paused sandbox's processes run on where they were."""
        return await lifetimes.resume(validate_name(name))

    # -- commands -----------------------------------------------------------------------------

    async def connection(self, name: str) -> Connection:
        return await self.pool.get(validate_name(name))

    async def exec(self, name: str, command: CommandSpec, *, pty: tuple[int, int] | None = None) -> Process:
        return await exec_on(await self.connection(name), command, pty=pty)

    # -- background commands (commands.py) ----------------------------------------------------

    async def start_command(self, name: str, command: CommandSpec) -> BackgroundCommand:
        """Start `command` detached: it runs on without any client, until it exits, its timeout is
        up, or the sandbox ends."""
        return await (await self.connection(name)).exec_background(
            command.argv, env=command.env, cwd=command.cwd, timeout=command.timeout
        )

    async def list_commands(self, name: str) -> list[BackgroundInfo]:
        return await (await self.connection(name)).list_background()

    async def command_info(self, name: str, command_id: int) -> BackgroundInfo:
        command_id = commands.check_command_id(command_id)
        return commands.find(await (await self.connection(name)).list_background(), command_id)

    async def command_output(
        self, name: str, command_id: int, *, offset: int = 0, follow: bool = True
    ) -> Attachment:
        """A reader of a background command's output from byte `offset` (0: from the start kept);
        raises at once for an unknown id."""
        command_id, offset = commands.check_command_id(command_id), commands.check_offset(offset)
        conn = await self.connection(name)
        return await conn.attach_background(command_id, offset=offset, follow=follow)

    async def command_stdin(self, name: str, command_id: int, data: bytes, *, eof: bool = False) -> None:
        command_id = commands.check_command_id(command_id)
        commands.check_stdin(data)
        await (await self.connection(name)).write_background(command_id, data, eof=eof)

    async def signal_command(self, name: str, command_id: int, signal: str | int) -> int:
        """Send `signal` (a name or number) to a background command; the signal's number."""
        command_id, signo = commands.check_command_id(command_id), commands.parse_signal(signal)
        await (await self.connection(name)).signal_background(command_id, signo)
        return signo

    async def wait_command(self, name: str, command_id: int) -> ExitStatus:
        command_id = commands.check_command_id(command_id)
        return await (await self.connection(name)).wait_background(command_id)

    # -- files --------------------------------------------------------------------------------

    async def stat(self, name: str, path: str) -> FileInfo:
        return await (await self.connection(name)).stat(guest_path(path))

    async def exists(self, name: str, path: str) -> bool:
        return await (await self.connection(name)).exists(guest_path(path))

    async def list_dir(self, name: str, path: str, *, depth: int = 1) -> list[FileInfo]:
        """A directory's entries by name; with `depth` > 1 those below it too, each named by its
        path relative to `path`, parents first (symlinks are not followed)."""
        path, depth = guest_path(path), files.check_depth(depth)
        conn = await self.connection(name)
        if depth == 1:  # in the guest's readdir order: sorted, as `walk` sorts each level
            return sorted(await conn.list_dir(path), key=lambda e: e.name)
        return await conn.walk(path, depth=depth)

    async def rename(self, name: str, path: str, to: str) -> FileInfo:
        """Move `path` to `to` (replacing a file there); what is at `to` afterwards."""
        path, to = guest_path(path), guest_path(to, field="to")
        if "/" in (path, to):
            raise InvalidRequestError("path", "refusing to move the sandbox's root directory")
        conn = await self.connection(name)
        await conn.rename(path, to)
        return await conn.stat(to)

    async def watch(self, name: str, path: str, *, recursive: bool = False) -> Watch:
        """Follow changes under directory `path`; the watch is active once this returns."""
        return await (await self.connection(name)).watch(guest_path(path), recursive=recursive)

    async def open_file(self, name: str, path: str) -> tuple[FileInfo, AsyncGenerator[bytes, None]]:
        """A regular file's metadata and its bytes as they arrive (errors come before any byte)."""
        path = guest_path(path)
        conn = await self.connection(name)
        info = await conn.stat(path)
        if info.kind != "file":
            raise NotAFileError(path, info.kind)
        chunks = conn.read_file(path)
        try:
            first = await anext(chunks, b"")
        except BaseException:
            await chunks.aclose()
            raise
        return info, _prepend(first, chunks)

    async def read_bytes(self, name: str, path: str, *, limit: int) -> bytes:
        """A whole file, refused if longer than `limit` bytes."""
        _info, chunks = await self.open_file(name, path)
        data = bytearray()
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                data += chunk
                if len(data) > limit:
                    raise AgentkernelError(f"{path} is larger than {limit} bytes")
        return bytes(data)

    async def write_file(
        self, name: str, path: str, chunks: AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        if not 0 <= mode <= 0o7777:
            raise InvalidRequestError("mode", f"must be between 0 and 0o7777 (got {mode:#o})")
        return await (await self.connection(name)).write_file(guest_path(path), chunks, mode=mode)

    async def mkdir(self, name: str, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        if not 0 <= mode <= 0o7777:
            raise InvalidRequestError("mode", f"must be between 0 and 0o7777 (got {mode:#o})")
        await (await self.connection(name)).mkdir(guest_path(path), parents=parents, mode=mode)

    async def remove_path(self, name: str, path: str, *, recursive: bool = False) -> None:
        path = guest_path(path)
        if path == "/":
            raise InvalidRequestError("path", "refusing to remove the sandbox's root directory")
        await (await self.connection(name)).remove(path, recursive=recursive)

    # -- ports (ports.py) -----------------------------------------------------------------------

    async def expose_port(
        self, name: str, port: int, *, host: str | None = None, host_port: int | None = None
    ) -> ports.ForwardedPort:
        """Reach guest port `port` of running sandbox `name` from the host: where it listens (on
        `host`, default 127.0.0.1, port `host_port`, default the one it has or a free one), if the
        sandbox's policy allows it. Asking again for a forwarded port gives the same address."""
        name = validate_name(name)
        return await ports.expose(
            name, port, host=host, host_port=host_port, connection=lambda: self.connection(name)
        )

    async def list_ports(self, name: str) -> list[ports.ForwardedPort]:
        return await ports.forwarded(validate_name(name))


def _create(
    name: str, request: SandboxRequest, *, owned: bool, pool: str | None = None, made: list[str] | None = None
) -> SandboxRecord:
    record = sandboxes.create(
        name,
        image=request.image,
        backend=request.backend,
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        disk_mb=request.disk_mb,
        policy=request.policy,
        mount_dir=request.mount_dir,
        lifetime=request.lifetime,
        secrets=request.secrets,
        env=request.env,
        labels=request.labels,
        pool=pool,
        owned=owned,
    )
    if made is not None:
        made.append(name)
    _warn_isolation(record)
    return record


def _take_pooled(request: SandboxRequest, made: list[str], keep: bool) -> bool:
    """A ready sandbox from the pool daemon, now this process's (or nobody's, with `keep`); its name
    is appended to `made`. False when the daemon has none of this kind."""
    name = sandboxes.take_pooled(
        image=request.image,
        backend=request.backend,
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        policy=request.policy,
        disk_mb=request.disk_mb,
    )
    if name is None:
        return False
    made.append(name)
    if keep:
        sandboxes.set_owner(name, None)
    _warn_isolation(sandboxes.get(name))
    return True


# -- the pool daemon's blocking calls (it makes sandboxes in a thread of its own) -------------------


def pool_key(request: SandboxRequest) -> str | None:
    """The key of the pool kind `request` belongs to (None: no guest kernel yet)."""
    return sandboxes.pool_key(
        image=request.image,
        backend=request.backend,
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        policy=request.policy,
    )


def hand_out(name: str, taker: owners.Owner) -> None:
    """Make a ready sandbox of the pool `taker`'s (no longer pooled), checked under its lock: a
    SandboxNotRunningError if it is no longer running."""
    with sandboxes.locked(name):
        record = sandboxes.get(name)
        if record.status != "running":
            raise SandboxNotRunningError(name, record.status)
        state.update(name, pool=None, owner=taker)


def take_over(name: str, key: str) -> bool:
    """Make a ready sandbox of kind `key` that a previous pool daemon left this process's, if it is still
    there and running (under its lock, so a reaper cannot remove it halfway)."""
    with contextlib.suppress(AgentkernelError), sandboxes.locked(name):
        record = sandboxes.get(name)
        if record.status == "running" and record.pool == key:
            state.update(name, owner=owners.current())
            return True
    return False


def pooled_records() -> list[SandboxRecord]:
    """The sandboxes of pool daemons (ready ones and templates being made), as recorded."""
    return [r for r in state.all_records() if r.pool]


async def reap_periodically(interval: float = owners.REAP_INTERVAL) -> None:
    """Remove sandboxes whose owner died, now and every `interval` seconds until cancelled: a server
    runs this for its whole life, so what a client that died (or a server before it) left is removed."""
    while True:
        try:
            for name in await anyio.to_thread.run_sync(sandboxes.reap):
                log.info("removed sandbox %s: its owner has died", name)
        except Exception as exc:  # the state database busy or broken: the next pass tries again
            log.error("reaper: %s", exc)
        await anyio.sleep(interval)


def _warn_isolation(record: SandboxRecord) -> None:
    """A sandbox that is a container, not a VM, is logged (the server's stderr); API and MCP
    responses that describe a sandbox say so in their `backend` field."""
    if warning := hostinfo.isolation_warning(record.backend):
        log.warning("sandbox %s: %s", record.name, warning)


@dataclass(frozen=True)
class CommandSpec:
    """A command and how to run it, checked before anything is started for it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    timeout: float | None

    @classmethod
    def checked(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> CommandSpec:
        command, environment = check_command(argv), check_env(env)
        check_arguments(command, environment)  # before a sandbox is made for a command that cannot run
        return cls(
            command,
            environment,
            guest_path(cwd, field="cwd") if cwd is not None else None,
            check_timeout(timeout),
        )


async def exec_on(conn: Connection, command: CommandSpec, *, pty: tuple[int, int] | None = None) -> Process:
    return await conn.exec(command.argv, env=command.env, cwd=command.cwd, timeout=command.timeout, pty=pty)


@dataclass(frozen=True)
class Collected:
    status: ExitStatus
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration: float


async def collect(proc: Process, *, stdin: bytes = b"", limit: int) -> Collected:
    """Feed `stdin`, then keep the first `limit` bytes of each stream until the command exits."""
    started = time.monotonic()
    feeder = asyncio.create_task(_feed(proc, stdin))
    out = {"stdout": bytearray(), "stderr": bytearray()}
    cut = {"stdout": False, "stderr": False}
    try:
        async for chunk in proc.output():
            buf = out[chunk.stream]
            room = limit - len(buf)
            buf += chunk.data[: max(0, room)]
            cut[chunk.stream] |= len(chunk.data) > room
    finally:
        proc.abandon()
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, AgentkernelError):
            await feeder
    assert proc.status is not None
    return Collected(
        proc.status,
        bytes(out["stdout"]),
        bytes(out["stderr"]),
        cut["stdout"],
        cut["stderr"],
        time.monotonic() - started,
    )


async def _feed(proc: Process, data: bytes) -> None:
    await proc.write(data)
    await proc.close_stdin()


async def _prepend(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(rest):
        if first:
            yield first
        async for chunk in rest:
            yield chunk
