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
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from agentkernel.config import load_config, resolve_policy, resolve_resources
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.protocol.client import Connection, ExitStatus, FileInfo, Process
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import sandboxes
from agentkernel.service.connections import ConnectionPool

LOGIN_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi"]
MAX_PATH = 4096
MAX_ARGS = 4096


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
    if len(command) > MAX_ARGS:
        raise InvalidRequestError(field, f"more than {MAX_ARGS} arguments")
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


class Operations:
    """The service for one event loop. `project_dir` is where agentkernel.toml is looked up."""

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = project_dir
        self.pool = ConnectionPool()

    async def close(self) -> None:
        await self.pool.close()

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
        return sandboxes.create(name, **self._options(settings, command))

    def _options(self, settings: SandboxSettings, command: Sequence[str]) -> dict[str, Any]:
        """`sandboxes.create` options from the request, then agentkernel.toml, then the defaults."""
        config, _ = load_config(search_from=self.project_dir)
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
            "mount_dir": self.project_dir if policy.mount_cwd else None,
        }

    async def start(self, name: str) -> SandboxRecord:
        if (await self.get(name)).status == "running":
            raise SandboxStateError(f"sandbox '{name}' is already running")
        return await anyio.to_thread.run_sync(_start, name)

    async def stop(self, name: str) -> SandboxRecord:
        await self.pool.discard(name)
        return await anyio.to_thread.run_sync(_stop, name)

    async def remove(self, name: str, *, force: bool) -> None:
        if not force and (await self.get(name)).status == "running":
            raise SandboxStateError(f"sandbox '{name}' is running: stop it first or remove it with force")
        await self.pool.discard(name)
        await anyio.to_thread.run_sync(functools.partial(sandboxes.remove, name, force=force))

    @contextlib.asynccontextmanager
    async def ephemeral(self, command: Sequence[str], settings: SandboxSettings) -> AsyncIterator[Connection]:
        """A new sandbox for one command (its image chosen as `agentkernel run` does), from the pool
        daemon when it has one of this kind; removed after."""
        options = await anyio.to_thread.run_sync(self._options, settings, command)
        name = await anyio.to_thread.run_sync(functools.partial(sandboxes.take_pooled, **options))
        if name is None:
            record = await self.create(sandboxes.new_ephemeral_name(), settings, start=True, command=command)
            name = record.name
        try:
            yield await self.pool.get(name)
        finally:
            with anyio.CancelScope(shield=True):
                await self.remove(name, force=True)

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
        return cls(
            check_command(argv),
            check_env(env),
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


def _start(name: str) -> SandboxRecord:
    return asyncio.run(sandboxes.start(name))


def _stop(name: str) -> SandboxRecord:
    return asyncio.run(sandboxes.stop(name))
