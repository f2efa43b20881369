"""agentkernel's tools over the Model Context Protocol, on the official MCP Python SDK.

Every tool calls the same service as the CLI and the HTTP API. Expected failures (no such sandbox, a
bad path, a command that cannot start) come back as tool errors whose text says what went wrong;
output and file contents are bounded so a result always fits an agent's context.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import posixpath
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Literal, ParamSpec, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from agentkernel import __version__
from agentkernel.errors import AgentkernelError
from agentkernel.protocol.client import FileInfo
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service.operations import (
    Collected,
    CommandSpec,
    Operations,
    SandboxSettings,
    collect,
    exec_on,
)

OUTPUT_LIMIT = 256 << 10
"""Bytes of stdout and of stderr a command's result holds; the rest is cut (and says so)."""
READ_LIMIT = 1 << 20

P = ParamSpec("P")
R = TypeVar("R")

INSTRUCTIONS = """\
agentkernel runs commands in microVM sandboxes: each has its own Linux kernel, isolated from the host.
Use run_command for a one-off command in a fresh sandbox (removed afterwards). For work that spans
several commands, create_sandbox, then exec_in_sandbox / read_file / write_file / list_files on it, and
remove_sandbox when done. A command given as one string runs with /bin/sh -c."""

CommandArg = Annotated[
    list[str] | str,
    Field(description="The program and its arguments, or one string that is run with /bin/sh -c."),
]
Name = Annotated[str, Field(description="The sandbox's name.")]
Cwd = Annotated[str | None, Field(description="Working directory in the sandbox (absolute path).")]
Env = Annotated[dict[str, str] | None, Field(description="Environment variables for the command.")]
Timeout = Annotated[float | None, Field(description="Kill the command after this many seconds.", gt=0)]
Profile = Literal["permissive", "moderate", "restrictive"]


class CommandResult(BaseModel):
    exit_code: int | None = Field(description="None if the command was killed by a signal.")
    signal: int | None
    timed_out: bool
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool


class SandboxInfo(BaseModel):
    name: str
    status: str
    image: str
    vcpus: int
    memory_mb: int
    profile: str
    created_at: str

    @classmethod
    def of(cls, r: SandboxRecord) -> SandboxInfo:
        return cls(
            name=r.name,
            status=r.status,
            image=r.image,
            vcpus=r.vcpus,
            memory_mb=r.memory_mb,
            profile=r.profile,
            created_at=r.created_at,
        )


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class FileContent(BaseModel):
    path: str
    encoding: Literal["utf-8", "base64"] = Field(description="base64 when the file is not UTF-8 text.")
    content: str
    size: int


class Entry(BaseModel):
    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str

    @classmethod
    def of(cls, info: FileInfo) -> Entry:
        return cls.model_validate(
            {"name": info.name, "kind": info.kind, "size": info.size, "mode": f"{info.mode:04o}"}
        )


class Listing(BaseModel):
    path: str
    entries: list[Entry]


class Done(BaseModel):
    ok: bool = True
    detail: str


def _reported(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn the service's expected failures into tool errors with their one-line message."""

    @functools.wraps(fn)
    async def tool(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except AgentkernelError as exc:
            raise ToolError(str(exc)) from None

    return tool


def _command(
    command: list[str] | str, env: dict[str, str] | None, cwd: str | None, timeout: float | None
) -> CommandSpec:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
    return CommandSpec.checked(argv, env=env, cwd=cwd, timeout=timeout)


def _result(collected: Collected) -> CommandResult:
    status = collected.status
    return CommandResult(
        exit_code=status.exit_code,
        signal=status.signal,
        timed_out=status.timed_out,
        stdout=collected.stdout.decode(errors="replace"),
        stderr=collected.stderr.decode(errors="replace"),
        stdout_truncated=collected.stdout_truncated,
        stderr_truncated=collected.stderr_truncated,
    )


def build_server(project_dir: Path) -> MCPServer[None]:
    ops = Operations(project_dir)

    @contextlib.asynccontextmanager
    async def lifespan(_server: MCPServer[None]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await ops.close()

    mcp: MCPServer[None] = MCPServer(
        "agentkernel", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan
    )

    @mcp.tool()
    @_reported
    async def run_command(
        command: CommandArg,
        image: Annotated[
            str | None, Field(description="Image: base, python, node, ... (default: detected).")
        ] = None,
        profile: Annotated[Profile | None, Field(description="Security profile (default moderate).")] = None,
        cwd: Cwd = None,
        env: Env = None,
        timeout: Timeout = None,
    ) -> CommandResult:
        """Run a command in a new sandbox, which is removed afterwards; returns its exit code and output."""
        spec = _command(command, env, cwd, timeout)
        async with ops.ephemeral(spec.argv, SandboxSettings(image=image, profile=profile)) as conn:
            return _result(await collect(await exec_on(conn, spec), limit=OUTPUT_LIMIT))

    @mcp.tool()
    @_reported
    async def create_sandbox(
        name: Annotated[str | None, Field(description="Name (default: sandbox-XXXXXXXX).")] = None,
        image: Annotated[
            str | None, Field(description="Image: base, python, node, ... (default base).")
        ] = None,
        profile: Annotated[Profile | None, Field(description="Security profile (default moderate).")] = None,
        vcpus: Annotated[int | None, Field(ge=1, le=32)] = None,
        memory_mb: Annotated[int | None, Field(ge=64, le=65536)] = None,
        start: Annotated[bool, Field(description="Boot it as well.")] = True,
    ) -> SandboxInfo:
        """Create a sandbox that lasts until removed (booted unless start is false)."""
        settings = SandboxSettings(image=image, vcpus=vcpus, memory_mb=memory_mb, profile=profile)
        return SandboxInfo.of(await ops.create(name, settings, start=start))

    @mcp.tool()
    @_reported
    async def exec_in_sandbox(
        name: Name, command: CommandArg, cwd: Cwd = None, env: Env = None, timeout: Timeout = None
    ) -> CommandResult:
        """Run a command in a running sandbox; returns its exit code and output."""
        proc = await ops.exec(name, _command(command, env, cwd, timeout))
        return _result(await collect(proc, limit=OUTPUT_LIMIT))

    @mcp.tool()
    @_reported
    async def list_sandboxes() -> SandboxList:
        """List all sandboxes and their status."""
        return SandboxList(sandboxes=[SandboxInfo.of(r) for r in await ops.list_sandboxes()])

    @mcp.tool()
    @_reported
    async def start_sandbox(name: Name) -> SandboxInfo:
        """Boot a stopped sandbox."""
        return SandboxInfo.of(await ops.start(name))

    @mcp.tool()
    @_reported
    async def stop_sandbox(name: Name) -> SandboxInfo:
        """Power a sandbox off; its disk is kept for the next start."""
        return SandboxInfo.of(await ops.stop(name))

    @mcp.tool()
    @_reported
    async def remove_sandbox(
        name: Name, force: Annotated[bool, Field(description="Remove it even if running.")] = False
    ) -> Done:
        """Remove a sandbox and everything on its disk."""
        await ops.remove(name, force=force)
        return Done(detail=f"removed {name}")

    @mcp.tool()
    @_reported
    async def read_file(
        name: Name, path: Annotated[str, Field(description="Absolute path in the sandbox.")]
    ) -> FileContent:
        """Read a file from a sandbox (at most 1 MiB)."""
        data = await ops.read_bytes(name, path, limit=READ_LIMIT)
        try:
            return FileContent(path=path, encoding="utf-8", content=data.decode(), size=len(data))
        except UnicodeDecodeError:
            return FileContent(
                path=path, encoding="base64", content=base64.b64encode(data).decode(), size=len(data)
            )

    @mcp.tool()
    @_reported
    async def write_file(
        name: Name,
        path: Annotated[str, Field(description="Absolute path in the sandbox; missing parents are created.")],
        content: str,
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="How content is encoded.")
        ] = "utf-8",
        mode: Annotated[str, Field(pattern="^0?[0-7]{1,4}$", description="Octal permissions.")] = "644",
    ) -> Done:
        """Write a file in a sandbox, replacing it whole."""
        data = _decode(content, encoding)
        await ops.mkdir(name, posixpath.dirname(path) or "/", parents=True)
        size = await ops.write_file(name, path, _once(data), mode=int(mode, 8))
        return Done(detail=f"wrote {size} bytes to {path}")

    @mcp.tool()
    @_reported
    async def list_files(
        name: Name, path: Annotated[str, Field(description="Absolute directory path in the sandbox.")] = "/"
    ) -> Listing:
        """List a directory in a sandbox."""
        return Listing(path=path, entries=[Entry.of(e) for e in await ops.list_dir(name, path)])

    return mcp


def _decode(content: str, encoding: str) -> bytes:
    if encoding == "utf-8":
        return content.encode()
    try:
        return base64.b64decode(content, validate=True)
    except ValueError:
        raise AgentkernelError("content: not valid base64") from None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def run(transport: Literal["stdio", "http"], *, host: str, port: int, project_dir: Path) -> None:
    """Serve until the client goes away (stdio) or until interrupted (http, loopback only)."""
    server = build_server(project_dir)
    if transport == "stdio":
        server.run("stdio")
        return
    from agentkernel.network.policy import is_loopback_name

    if not is_loopback_name(host):
        raise AgentkernelError(
            f"refusing to serve MCP on {host}: it has no authentication, so it listens on loopback only"
        )
    server.run("streamable-http", host=host, port=port)
