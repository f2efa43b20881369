"""The sandbox service as long-running async servers (the HTTP API, the MCP server) call it.

`sandboxes` is the implementation; this adapts it to a server that must keep answering while
sandboxes boot and commands run. Blocking calls (qemu-img, a boot that holds the sandbox's file lock,
killing a VM) run in worker threads, and a cancelled request still waits for its thread, so cleanup
never races it. Commands and file operations share one agent connection per sandbox (ConnectionPool).
Input is checked here, once for every caller: errors name the field they are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from agentkernel import hostinfo
from agentkernel.config import load_config, resolve_policy, resolve_resources
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.network import brokering
from agentkernel.protocol.client import Connection, ExitStatus, FileInfo, Process, check_arguments
from agentkernel.sandbox.state import NoSuchSandboxError, SandboxRecord
from agentkernel.service import owners, sandboxes
from agentkernel.service.connections import ConnectionPool

LOGIN_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi"]
MAX_PATH = 4096
log = logging.getLogger("agentkernel.service")


class InvalidRequestError(AgentkernelError):
    """Bad input; `field` names the parameter it came in, `code` says what kind of problem it is."""

    def __init__(self, field: str, message: str, *, code: str = "invalid_field") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.code = code


class UnknownImageError(InvalidRequestError):
    pass


class SandboxStateError(AgentkernelError):
    """The sandbox is in the wrong state for the request (say, removing a running one)."""


class NotAFileError(AgentkernelError):
    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is not a regular file (it is a {kind})")
        self.kind = kind


def guest_path(path: str, *, field: str = "path") -> str:
    """`path` normalized as an absolute path in the guest; no NUL, no `..`, bounded in length.

    The path is only ever resolved by the guest: this just refuses what cannot be meant honestly.
    """
    problem = None
    if not path.startswith("/"):
        problem = f"must be an absolute path in the sandbox (got {_shown(path)})"
    elif "\0" in path:
        problem = "must not contain NUL"
    elif len(path.encode()) > MAX_PATH:
        problem = f"longer than {MAX_PATH} bytes"
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        problem = f"must not contain '..' segments (got {_shown(path)})"
    if problem:
        raise InvalidRequestError(field, problem, code="invalid_path")
    return "/" + "/".join(parts)


def check_command(command: Sequence[str], *, field: str = "command") -> list[str]:
    if not command:
        raise InvalidRequestError(field, "must hold at least the program to run")
    if any("\0" in arg for arg in command):
        raise InvalidRequestError(field, "arguments must not contain NUL")
    return list(command)


def check_env(env: Mapping[str, str] | None, *, field: str = "env") -> dict[str, str]:
    checked = {}
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidRequestError(field, f"{_shown(key)}: names must be non-empty without '=' or NUL")
        checked[key] = value
    return checked


def check_timeout(timeout: float | None, *, field: str = "timeout") -> float | None:
    if timeout is not None and not 0 < timeout <= 7 * 24 * 3600:
        raise InvalidRequestError(field, f"must be between 0 and 604800 seconds (got {timeout:g})")
    return timeout


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


@dataclass(frozen=True)
class SandboxSettings:
    """Settings of a new sandbox; None means the project's agentkernel.toml, else the default."""

    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    profile: str | None = None
    secrets: tuple[str, ...] = ()
    """Names of secrets this server holds (agentkernel.toml [secrets], the secret store)."""


class Operations:
    """The service for one event loop. `project_dir` is where agentkernel.toml is looked up."""

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = project_dir
        self.pool = ConnectionPool()
        self.ephemerals: set[str] = set()  # made for one request, not yet removed

    async def close(self) -> None:
        """Close connections, and remove the sandboxes of requests still running: a stopping server
        cancels them, and the cancellation may not leave their own cleanup time to finish."""
        await self.pool.close()
        for name in list(self.ephemerals):
            await self._remove_ephemeral(name)

    # -- life cycle ---------------------------------------------------------------------------

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return await anyio.to_thread.run_sync(sandboxes.list_sandboxes)

    async def get(self, name: str) -> SandboxRecord:
        return await anyio.to_thread.run_sync(sandboxes.get, name)

    async def create(
        self, name: str | None, settings: SandboxSettings, *, start: bool, command: Sequence[str] = ()
    ) -> SandboxRecord:
        """Create a sandbox; with `start`, boot it too (and remove it again if it does not boot)."""
        name = sandboxes.validate_name(name) if name else f"sandbox-{secrets.token_hex(4)}"
        record = await anyio.to_thread.run_sync(self._create, name, settings, command)
        if not start:
            return record
        try:
            return await self.start(name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=True))
            raise

    def _create(self, name: str, settings: SandboxSettings, command: Sequence[str]) -> SandboxRecord:
        record = sandboxes.create(name, **self._options(settings, command))
        _warn_isolation(record)
        return record

    def _options(self, settings: SandboxSettings, command: Sequence[str]) -> dict[str, Any]:
        """`sandboxes.create` options from the request, then agentkernel.toml, then the defaults."""
        config, config_path = load_config(search_from=self.project_dir)
        base = config_path.parent if config_path else self.project_dir
        bindings = brokering.bind(settings.secrets, config.secrets, base=base)
        image, _why = sandboxes.choose_image(list(command), settings.image, config, self.project_dir)
        try:
            store.get(image)
        except store.CorruptImageError:
            raise
        except AgentkernelError as exc:
            raise UnknownImageError("image", str(exc)) from None
        policy = resolve_policy(config, profile=settings.profile)
        vcpus, memory_mb = resolve_resources(config, vcpus=settings.vcpus, memory_mb=settings.memory_mb)
        return {
            "image": image,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "policy": policy,
            "backend": config.sandbox.backend,
            "mount_dir": self.project_dir if policy.mount_cwd else None,
            "secrets": bindings,
        }

    async def start(self, name: str) -> SandboxRecord:
        if (status := (await self.get(name)).status) in ("running", "starting"):
            raise SandboxStateError(f"sandbox '{name}' is already {status}")
        return await anyio.to_thread.run_sync(_start, name)

    async def stop(self, name: str) -> SandboxRecord:
        await self.pool.discard(name)
        return await anyio.to_thread.run_sync(_stop, name)

    async def remove(self, name: str, *, force: bool) -> None:
        if not force and (status := (await self.get(name)).status) in ("running", "starting"):
            raise SandboxStateError(f"sandbox '{name}' is {status}: stop it first or remove it with force")
        await self.pool.discard(name)
        await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=force))

    @contextlib.asynccontextmanager
    async def ephemeral(self, command: Sequence[str], settings: SandboxSettings) -> AsyncIterator[Connection]:
        """A new sandbox for one command (its image chosen as `agentkernel run` does), from the pool
        daemon when it has one of this kind; removed after, also when the caller is cancelled (a client
        that went away, an MCP request cancelled).

        The sandbox is this process's (see `owners`): should the server die first, a reaper removes it.
        """
        options = await anyio.to_thread.run_sync(self._options, settings, command)
        made: list[str] = []  # filled in the worker thread: a wait cancelled after it still knows
        try:
            pooled = await anyio.to_thread.run_sync(_take_or_create, options, made)
            name = made[0]
            self.ephemerals.add(name)
            if pooled:
                _warn_isolation(await self.get(name))
            else:
                await _boot_cancellably(name)
            yield await self.pool.get(name)
        finally:
            if made:
                with anyio.CancelScope(shield=True):
                    await self._remove_ephemeral(made[0])

    async def _remove_ephemeral(self, name: str) -> None:
        await self.pool.discard(name)
        with contextlib.suppress(NoSuchSandboxError):  # removed already (by close, or a reaper)
            await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=True))
        self.ephemerals.discard(name)

    # -- commands -----------------------------------------------------------------------------

    async def connection(self, name: str) -> Connection:
        return await self.pool.get(sandboxes.validate_name(name))

    async def exec(self, name: str, command: CommandSpec, *, pty: tuple[int, int] | None = None) -> Process:
        return await exec_on(await self.connection(name), command, pty=pty)

    # -- files --------------------------------------------------------------------------------

    async def stat(self, name: str, path: str) -> FileInfo:
        return await (await self.connection(name)).stat(guest_path(path))

    async def list_dir(self, name: str, path: str) -> list[FileInfo]:
        return await (await self.connection(name)).list_dir(guest_path(path))

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

    async def mkdir(self, name: str, path: str, *, parents: bool = True) -> None:
        await (await self.connection(name)).mkdir(guest_path(path), parents=parents)

    async def remove_path(self, name: str, path: str, *, recursive: bool = False) -> None:
        path = guest_path(path)
        if path == "/":
            raise InvalidRequestError("path", "refusing to remove the sandbox's root directory")
        await (await self.connection(name)).remove(path, recursive=recursive)


def _take_or_create(options: dict[str, Any], made: list[str]) -> bool:
    """A ready sandbox from the pool daemon (True), else a new one made for this process (False);
    its name is appended to `made`."""
    name = sandboxes.take_pooled(**options)
    if name is not None:
        made.append(name)
        return True
    name = sandboxes.new_ephemeral_name()
    _warn_isolation(sandboxes.create(name, owned=True, **options))
    made.append(name)
    return False


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


async def _boot_cancellably(name: str) -> None:
    """Boot the sandbox in a worker thread (in an event loop of its own there); if the caller is
    cancelled meanwhile, the boot is cancelled too (its VM killed) rather than waited for."""
    booting: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []
    started = threading.Event()

    async def boot() -> None:
        task = asyncio.current_task()
        assert task is not None
        booting.append((asyncio.get_running_loop(), task))
        started.set()
        await sandboxes.start(name)

    def run() -> None:
        try:
            asyncio.run(boot())
        finally:
            started.set()

    worker = asyncio.get_running_loop().run_in_executor(None, run)
    try:
        await asyncio.shield(worker)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(started.wait)
            if booting and not worker.done():
                loop, task = booting[0]
                with contextlib.suppress(RuntimeError):  # its loop has just closed: the boot is over
                    loop.call_soon_threadsafe(task.cancel)
            with contextlib.suppress(BaseException):
                await worker
        raise


def _start(name: str) -> SandboxRecord:
    return asyncio.run(sandboxes.start(name))


def _stop(name: str) -> SandboxRecord:
    return asyncio.run(sandboxes.stop(name))
