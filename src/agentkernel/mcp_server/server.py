"""agentkernel's tools over the Model Context Protocol, on the official MCP Python SDK.

Every tool calls the same service as the CLI and the HTTP API. Expected failures (no such sandbox, a
bad path, a command that cannot start, arguments the tool does not take) come back as tool errors whose
text says what went wrong and what to do about it, in the tools' own terms.

A command's output can be far larger than an agent's context, so a result shows each stream as its
head and tail (`output_limit` bytes in all, cut at line ends) with a line in between saying what was
left out and where to read it: `exec_in_sandbox` saves the whole stream to a file in the sandbox (read
with `read_file` and an offset), and `run_command`, whose sandbox is gone by then, keeps it in this
process's memory for its most recent results (read with `get_output`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import functools
import posixpath
import re
import secrets as tokens
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentkernel import __version__
from agentkernel.errors import AgentkernelError
from agentkernel.mcp_server.files import file_tools
from agentkernel.mcp_server.lifecycle import lifecycle_tools
from agentkernel.mcp_server.ports import port_tools
from agentkernel.protocol.connection import ExitStatus, FileInfo, Process
from agentkernel.sandbox.view import SandboxView
from agentkernel.service.files import MAX_DEPTH, MODE_DESCRIPTION, MODE_PATTERN, format_mode, parse_mode
from agentkernel.service.lifetimes import DEFAULT_LIFETIME, lifetime_for
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import CommandSpec, SandboxService, exec_on

OUTPUT_LIMIT = 16 << 10
"""Bytes of each stream a command's result shows by default (head and tail)."""
MAX_OUTPUT_LIMIT = 1 << 20
MIN_OUTPUT_LIMIT = 256
SAVED_LIMIT = 8 << 20
"""Bytes of each stream kept for reading later; past this, the rest of a stream is only counted."""
KEPT_RESULTS = 32
KEPT_BYTES = 64 << 20
"""run_command outputs kept in memory: the most recent KEPT_RESULTS, at most KEPT_BYTES in all."""
OUTPUT_DIR = "/tmp/agentkernel-output"
READ_LIMIT = 1 << 20

P = ParamSpec("P")
R = TypeVar("R")
Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")

INSTRUCTIONS = """\
agentkernel runs commands in microVM sandboxes: each has its own Linux kernel, isolated from the host.
Use run_command for a one-off command in a fresh sandbox (removed afterwards). For work that spans
several commands, create_sandbox, then exec_in_sandbox / read_file / write_file / list_files on it, and
remove_sandbox when done (a sandbox is stopped when its lifetime is over: set_sandbox_timeout
extends it). start_command runs a server or a long job in the background (read_command_output,
wait_command and kill_command follow it). A command given as one string runs with /bin/sh -c.
Long output is shown as its head and tail with a line saying what was left out and how to read it
(read_file with an offset, or get_output)."""

CommandArg = Annotated[
    list[str] | str,
    Field(description="The program and its arguments, or one string that is run with /bin/sh -c."),
]
Name = Annotated[str, Field(description="The sandbox's name.")]
Cwd = Annotated[str | None, Field(description="Working directory in the sandbox (absolute path).")]
Env = Annotated[dict[str, str] | None, Field(description="Environment variables for the command.")]
Timeout = Annotated[float | None, Field(description="Kill the command after this many seconds.", gt=0)]
Profile = Literal["permissive", "moderate", "restrictive"]
ProfileArg = Annotated[
    Profile | None,
    Field(
        description="Security profile (default moderate): permissive shares the project directory at "
        "/workspace and the network; restrictive has no network."
    ),
]
Secrets = Annotated[
    tuple[str, ...],
    Field(
        description="Names of secrets the server holds, to give the sandbox: it sees placeholders; the "
        "values go only to each secret's hosts, through the server's egress gateway.",
        max_length=32,
    ),
]
OutputLimit = Annotated[
    int | None,
    Field(
        description=f"Bytes of each of stdout and stderr to show, as head and tail "
        f"({MIN_OUTPUT_LIMIT} to {MAX_OUTPUT_LIMIT}; default: the server's, normally {OUTPUT_LIMIT}).",
        ge=MIN_OUTPUT_LIMIT,
        le=MAX_OUTPUT_LIMIT,
    ),
]
Offset = Annotated[int, Field(description="Byte offset to start reading at.", ge=0)]
Length = Annotated[int, Field(description=f"Bytes to read, at most {READ_LIMIT}.", ge=1, le=READ_LIMIT)]


class CommandResult(BaseModel):
    exit_code: int | None = Field(description="None if the command was killed by a signal.")
    signal: int | None = Field(description="The signal that killed the command, if one did.")
    timed_out: bool = Field(description="The command was killed for running past its timeout.")
    stdout: str = Field(description="Standard output; when truncated, its head and tail and a line between.")
    stderr: str = Field(description="Standard error; when truncated, its head and tail and a line between.")
    stdout_truncated: bool = Field(description="Part of stdout is not shown here.")
    stderr_truncated: bool = Field(description="Part of stderr is not shown here.")
    stdout_bytes: int = Field(description="Size of the whole stdout.")
    stderr_bytes: int = Field(description="Size of the whole stderr.")
    output_id: str | None = Field(
        default=None, description="For get_output: set when run_command's output was truncated."
    )
    stdout_file: str | None = Field(
        default=None, description="Where exec_in_sandbox saved the whole stdout in the sandbox."
    )
    stderr_file: str | None = Field(
        default=None, description="Where exec_in_sandbox saved the whole stderr in the sandbox."
    )


class SandboxList(BaseModel):
    sandboxes: list[SandboxView]


class FileContent(BaseModel):
    path: str
    encoding: Literal["utf-8", "base64"] = Field(description="base64 when the bytes are not UTF-8 text.")
    content: str
    offset: int = Field(description="Where in the file content starts.")
    size: int = Field(description="The whole file's size.")
    next_offset: int | None = Field(description="The offset to read on from; None at the end of the file.")


class OutputSlice(BaseModel):
    output_id: str
    stream: Stream
    encoding: Literal["utf-8", "base64"] = Field(description="base64 when the bytes are not UTF-8 text.")
    content: str
    offset: int
    size: int = Field(description="Bytes of the stream that were kept.")
    complete: bool = Field(description=f"False when the stream was longer than the {SAVED_LIMIT} bytes kept.")
    next_offset: int | None = Field(description="The offset to read on from; None at the end.")


class Entry(BaseModel):
    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str

    @classmethod
    def of(cls, info: FileInfo) -> Entry:
        return cls.model_validate(
            {"name": info.name, "kind": info.kind, "size": info.size, "mode": format_mode(info.mode)}
        )


class Listing(BaseModel):
    path: str
    entries: list[Entry]


class Done(BaseModel):
    ok: bool = True
    detail: str


@dataclass
class Captured:
    """One stream of a command: its first SAVED_LIMIT bytes, its last bytes, its size and line count."""

    tail_limit: int
    saved: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    size: int = 0
    lines: int = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self.lines += data.count(b"\n")
        if len(self.saved) < SAVED_LIMIT:
            self.saved += data[: SAVED_LIMIT - len(self.saved)]
        self.tail += data
        if len(self.tail) > 2 * self.tail_limit:
            del self.tail[: -self.tail_limit]

    def shown(self, limit: int, where: Callable[[int], str]) -> tuple[str, bool]:
        """The stream within `limit` bytes, and whether it was cut: if it is longer, its head and tail
        (each cut at a line end where there is one) around a line saying how much was left out and,
        through `where(offset of the left-out part)`, how to read it."""
        if self.size <= limit:
            return bytes(self.saved).decode(errors="replace"), False
        head = bytes(self.saved[: limit // 2])
        if (end := head.rfind(b"\n")) >= 0:
            head = head[: end + 1]
        budget = limit - limit // 2
        tail = bytes(self.tail[-budget:])
        whole_lines = self.tail[-budget - 1 : -budget] == b"\n"
        if not whole_lines and 0 <= (start := tail.find(b"\n")) < len(tail) - 1:
            tail = tail[start + 1 :]
        left_bytes = self.size - len(head) - len(tail)
        left_lines = self.lines - head.count(b"\n") - tail.count(b"\n")
        marker = f"[... {left_bytes} bytes ({left_lines} lines) left out: {where(len(head))} ...]\n"
        text = head.decode(errors="replace") + ("" if head.endswith(b"\n") or not head else "\n")
        return text + marker + tail.decode(errors="replace"), True


class OutputStore:
    """Whole outputs of recent run_command calls (their sandboxes are gone), in this process's memory:
    the newest `count`, at most `budget` bytes in all (each stream at most SAVED_LIMIT)."""

    def __init__(self, count: int = KEPT_RESULTS, budget: int = KEPT_BYTES) -> None:
        self._count = count
        self._budget = budget
        self._kept: OrderedDict[str, dict[Stream, Captured]] = OrderedDict()
        self._bytes = 0

    def keep(self, captured: dict[Stream, Captured]) -> str:
        key = tokens.token_hex(6)
        self._kept[key] = captured
        self._bytes += sum(len(c.saved) for c in captured.values())
        while len(self._kept) > self._count or self._bytes > self._budget:
            _, old = self._kept.popitem(last=False)
            self._bytes -= sum(len(c.saved) for c in old.values())
        return key

    def get(self, key: str, stream: Stream) -> Captured:
        try:
            return self._kept[key][stream]
        except KeyError:
            raise AgentkernelError(
                f"no output with output_id {key!r}: only the {self._count} most recent truncated "
                "run_command results are kept, and none across restarts of this server; run the "
                "command again (or use exec_in_sandbox, which saves output in the sandbox)"
            ) from None


AGENT_HINTS = [
    (re.compile(r" \(see `agentkernel list`\)"), ": list_sandboxes shows the sandboxes there are"),
    (re.compile(r"start it with `agentkernel start [^`]*`"), "start it with start_sandbox"),
    (
        re.compile(r"run `agentkernel setup` or `agentkernel image build/pull`"),
        "it is not built on this host; use another image (base, python and node are the usual ones) "
        "or ask the user to build it",
    ),
    (re.compile(r"\(?`agentkernel [^`]*`\)?"), "(the user can fix this on the host)"),
]
"""The service's hints name CLI commands; an agent gets the tool to use, or who can help, instead."""


def for_agent(message: str) -> str:
    for pattern, hint in AGENT_HINTS:
        message = pattern.sub(hint, message)
    return message


def _reported(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn the service's expected failures into tool errors with their one-line message."""

    @functools.wraps(fn)
    async def tool(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except AgentkernelError as exc:
            raise ToolError(for_agent(str(exc))) from None

    return tool


def invalid_arguments(tool: str, error: ValidationError, known: list[str]) -> str:
    """One plain sentence per argument that failed validation (no pydantic jargon or links)."""
    by_argument: dict[str, list[Any]] = {}
    for problem in error.errors(include_url=False):
        by_argument.setdefault(str(problem["loc"][0]) if problem["loc"] else "", []).append(problem)
    sentences = []
    for argument, problems in by_argument.items():
        kinds = {p["type"] for p in problems}
        if "extra_forbidden" in kinds:
            close = difflib.get_close_matches(argument, known, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            sentences.append(
                f"'{argument}' is not an argument of {tool}{guess}; it takes: {', '.join(known)}."
            )
        elif "missing" in kinds:
            sentences.append(f"'{argument}' is required.")
        else:
            path = ".".join(str(part) for part in problems[0]["loc"]) if len(problems) == 1 else argument
            wants = list(dict.fromkeys(p["msg"].removeprefix("Input should be ") for p in problems))
            got = repr(problems[0]["input"])
            got = got if len(got) <= 60 else got[:57] + "..."
            sentences.append(f"'{path}' should be {' or '.join(wants)} (got {got}).")
    return f"Invalid arguments for {tool}: " + " ".join(sentences)


class AgentServer(MCPServer[None]):
    """The SDK's server, with argument errors rewritten for the agent that made them."""

    def __init__(self, tools: list[Tool], **settings: Any) -> None:
        super().__init__(tools=tools, **settings)
        self._arguments = {t.name: list(t.parameters.get("properties", {})) for t in tools}

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[None, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc, UnexpectedToolError) or not isinstance(exc.__cause__, ValidationError):
                raise
            raise ToolError(invalid_arguments(name, exc.__cause__, self._arguments[name])) from None


def strict(tool: Tool) -> Tool:
    """`tool` refusing arguments it does not take (the SDK's argument models ignore them)."""
    loose = tool.fn_metadata.arg_model
    model: type[BaseModel] = type(
        loose.__name__, (loose,), {"model_config": ConfigDict(extra="forbid"), "__module__": __name__}
    )
    return tool.model_copy(
        update={
            "fn_metadata": tool.fn_metadata.model_copy(update={"arg_model": model}),
            "parameters": model.model_json_schema(by_alias=True),
        }
    )


def hints(*, read_only: bool, destructive: bool, idempotent: bool, open_world: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )


READS = hints(read_only=True, destructive=False, idempotent=True, open_world=False)


def _command(
    command: list[str] | str, env: dict[str, str] | None, cwd: str | None, timeout: float | None
) -> CommandSpec:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
    return CommandSpec.checked(argv, env=env, cwd=cwd, timeout=timeout)


async def gather(proc: Process, limit: int) -> tuple[ExitStatus, dict[Stream, Captured]]:
    """Read a command's output until it exits (its stdin closed at once: MCP tools have none)."""
    captured: dict[Stream, Captured] = {s: Captured(limit) for s in STREAMS}
    closing = asyncio.create_task(proc.close_stdin())
    try:
        async for chunk in proc.output():
            captured["stdout" if chunk.stream == "stdout" else "stderr"].add(chunk.data)
    finally:
        proc.abandon()
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError, AgentkernelError):
            await closing
    assert proc.status is not None
    return proc.status, captured


def command_result(
    status: ExitStatus,
    captured: dict[Stream, Captured],
    limit: int,
    where: dict[Stream, Callable[[int], str]],
    **extra: Any,
) -> Annotated[CallToolResult, CommandResult]:
    """The result, structured and as text (for clients that read only the text): a summary line, then
    each stream as shown, so the bounded output is all an agent ever receives."""
    stdout, stdout_cut = captured["stdout"].shown(limit, where["stdout"])
    stderr, stderr_cut = captured["stderr"].shown(limit, where["stderr"])
    result = CommandResult(
        exit_code=status.exit_code,
        signal=status.signal,
        timed_out=status.timed_out,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=stdout_cut,
        stderr_truncated=stderr_cut,
        stdout_bytes=captured["stdout"].size,
        stderr_bytes=captured["stderr"].size,
        **extra,
    )
    if status.timed_out:
        ended = f"timed out (killed by signal {status.signal})"
    elif status.exit_code is None:
        ended = f"killed by signal {status.signal}"
    else:
        ended = f"exit code {status.exit_code}"
    cuts: dict[Stream, bool] = {"stdout": stdout_cut, "stderr": stderr_cut}
    sizes = ", ".join(
        f"{s} {captured[s].size} bytes" + (" (head and tail shown)" if cuts[s] else "") for s in STREAMS
    )
    text = f"{ended}; {sizes}" + "".join(
        f"\n--- {s} ---\n{shown}" for s, shown in (("stdout", stdout), ("stderr", stderr)) if shown
    )
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=result.model_dump(mode="json"),
    )


def text_slice(window: bytes, length: int) -> tuple[Literal["utf-8", "base64"], str, int]:
    """Up to `length` bytes of `window` (which holds up to 3 more, when there are more) as UTF-8 text
    that ends on a whole character, else as base64; and how many bytes that is."""
    end = min(length, len(window))
    while 0 < end < len(window) and end > length - 3 and (window[end] & 0xC0) == 0x80:
        end -= 1
    if end == 0:  # not even one whole character fits: the bytes as they are
        end = min(length, len(window))
    try:
        return "utf-8", window[:end].decode(), end
    except UnicodeDecodeError:
        end = min(length, len(window))
        return "base64", base64.b64encode(window[:end]).decode(), end


async def window(chunks: AsyncIterator[bytes], offset: int, length: int) -> bytes:
    """Bytes `offset` to `offset + length` of a file read as chunks."""
    out = bytearray()
    pos = 0
    async for chunk in chunks:
        start = max(0, offset - pos)
        pos += len(chunk)
        if start < len(chunk):
            out += chunk[start : start + length - len(out)]
        if len(out) >= length:
            break
    return bytes(out)


def checked_limit(limit: int | None) -> int:
    if limit is None:
        return OUTPUT_LIMIT
    if not MIN_OUTPUT_LIMIT <= limit <= MAX_OUTPUT_LIMIT:
        raise AgentkernelError(
            f"the output limit must be between {MIN_OUTPUT_LIMIT} and {MAX_OUTPUT_LIMIT} bytes (got {limit})"
        )
    return limit


def build_server(
    project_dir: Path, *, output_limit: int | None = None, default_lifetime: float | None = DEFAULT_LIFETIME
) -> MCPServer[None]:
    """The server; `output_limit` is the bytes of each stream a result shows unless a call asks for
    another (default OUTPUT_LIMIT); `default_lifetime` the seconds a sandbox made without a lifetime
    runs (None: until removed)."""
    sandboxes = SandboxService(project_dir)
    outputs = OutputStore()
    default_limit = checked_limit(output_limit)
    tools: list[Tool] = []

    def tool(annotations: ToolAnnotations) -> Callable[[Callable[P, Awaitable[R]]], None]:
        def register(fn: Callable[P, Awaitable[R]]) -> None:
            tools.append(strict(Tool.from_function(_reported(fn), annotations=annotations)))

        return register

    @tool(hints(read_only=False, destructive=False, idempotent=False, open_world=True))
    async def run_command(
        command: CommandArg,
        image: Annotated[
            str | None, Field(description="Image: base, python, node, ... (default: detected).")
        ] = None,
        profile: ProfileArg = None,
        secrets: Secrets = (),
        cwd: Cwd = None,
        env: Env = None,
        timeout: Timeout = None,
        output_limit: OutputLimit = None,
    ) -> Annotated[CallToolResult, CommandResult]:
        """Run a command in a new sandbox, which is removed afterwards; returns its exit code and
        output. Output past the limit is shown as head and tail; get_output reads all of it."""
        spec = _command(command, env, cwd, timeout)
        limit = output_limit or default_limit
        flags = SandboxFlags(image=image, profile=profile, secrets=tuple(secrets))
        request = await sandboxes.resolve(flags, command=spec.argv)
        async with sandboxes.ephemeral(request) as (_name, conn):
            status, captured = await gather(await exec_on(conn, spec), limit)
        if all(c.size <= limit for c in captured.values()):
            return command_result(status, captured, limit, {s: lambda _: "" for s in STREAMS})
        key = outputs.keep(captured)

        def where(stream: Stream) -> Callable[[int], str]:
            return lambda offset: (
                f'get_output(output_id="{key}", stream="{stream}", offset={offset}) reads them'
            )

        return command_result(status, captured, limit, {s: where(s) for s in STREAMS}, output_id=key)

    @tool(READS)
    async def get_output(
        output_id: Annotated[str, Field(description="The output_id of a run_command result.")],
        stream: Annotated[Stream, Field(description="stdout or stderr.")] = "stdout",
        offset: Offset = 0,
        length: Length = READ_LIMIT,
    ) -> OutputSlice:
        """Read the whole output of a recent run_command whose result was truncated, in pieces."""
        kept = outputs.get(output_id, stream)
        data = bytes(kept.saved)
        encoding, content, taken = text_slice(data[offset : offset + length + 3], length)
        end = offset + taken
        return OutputSlice(
            output_id=output_id,
            stream=stream,
            encoding=encoding,
            content=content,
            offset=offset,
            size=len(data),
            complete=kept.size == len(data),
            next_offset=end if end < len(data) else None,
        )

    @tool(hints(read_only=False, destructive=False, idempotent=False, open_world=False))
    async def create_sandbox(
        name: Annotated[str | None, Field(description="Name (default: sandbox-XXXXXXXX).")] = None,
        image: Annotated[
            str | None, Field(description="Image: base, python, node, ... (default base).")
        ] = None,
        profile: ProfileArg = None,
        vcpus: Annotated[int | None, Field(description="Virtual CPUs.")] = None,
        memory_mb: Annotated[int | None, Field(description="Memory in MiB.")] = None,
        start: Annotated[bool, Field(description="Boot it as well.")] = True,
        timeout: Annotated[
            float | None,
            Field(
                ge=0,
                description="Lifetime in seconds: it is stopped this long after it starts (default: "
                "the server's; 0: none). set_sandbox_timeout changes it.",
            ),
        ] = None,
        secrets: Secrets = (),
        env: Annotated[
            dict[str, str] | None,
            Field(description="Environment variables for every command in it (a command's own win)."),
        ] = None,
        labels: Annotated[
            dict[str, str] | None, Field(description="Labels to find it by (list_sandboxes filters on them).")
        ] = None,
    ) -> SandboxView:
        """Create a sandbox (booted unless start is false); it is stopped when its lifetime is over,
        and removed only by remove_sandbox."""
        flags = SandboxFlags(
            image=image,
            vcpus=vcpus,
            memory_mb=memory_mb,
            profile=profile,
            secrets=tuple(secrets),
            env=env or {},
            labels=labels or {},
            lifetime=lifetime_for(timeout, default_lifetime),
        )
        request = await sandboxes.resolve(flags)
        return SandboxView.of(await sandboxes.create(request, name=name, start=start))

    @tool(hints(read_only=False, destructive=True, idempotent=False, open_world=True))
    async def exec_in_sandbox(
        name: Name,
        command: CommandArg,
        cwd: Cwd = None,
        env: Env = None,
        timeout: Timeout = None,
        output_limit: OutputLimit = None,
    ) -> Annotated[CallToolResult, CommandResult]:
        """Run a command in a running sandbox; returns its exit code and output. Output past the limit
        is shown as head and tail; all of it is saved in a file in the sandbox, for read_file."""
        limit = output_limit or default_limit
        status, captured = await gather(
            await sandboxes.exec(name, _command(command, env, cwd, timeout)), limit
        )
        key = tokens.token_hex(6)
        where: dict[Stream, Callable[[int], str]] = {}
        files: dict[str, str] = {}
        for stream in STREAMS:
            where[stream] = lambda _: ""
            if captured[stream].size <= limit:
                continue
            path = f"{OUTPUT_DIR}/{key}.{stream}"
            try:
                await sandboxes.mkdir(name, OUTPUT_DIR, parents=True)
                await sandboxes.write_file(name, path, _once(bytes(captured[stream].saved)))
            except AgentkernelError as exc:
                where[stream] = functools.partial(_not_saved, str(exc))
                continue
            files[f"{stream}_file"] = path
            where[stream] = functools.partial(_saved, name, path, captured[stream].size > SAVED_LIMIT)
        return command_result(status, captured, limit, where, **files)

    @tool(READS)
    async def list_sandboxes(
        labels: Annotated[
            dict[str, str] | None, Field(description="Only the sandboxes that have all these labels.")
        ] = None,
    ) -> SandboxList:
        """List all sandboxes and their status."""
        found = await sandboxes.list_sandboxes(labels=labels)
        return SandboxList(sandboxes=[SandboxView.of(r) for r in found])

    @tool(hints(read_only=False, destructive=False, idempotent=False, open_world=False))
    async def start_sandbox(name: Name) -> SandboxView:
        """Boot a stopped sandbox."""
        return SandboxView.of(await sandboxes.start(name))

    @tool(hints(read_only=False, destructive=True, idempotent=True, open_world=False))
    async def stop_sandbox(name: Name) -> SandboxView:
        """Power a sandbox off (its processes end); its disk is kept for the next start."""
        return SandboxView.of(await sandboxes.stop(name))

    @tool(hints(read_only=False, destructive=True, idempotent=True, open_world=False))
    async def remove_sandbox(
        name: Name, force: Annotated[bool, Field(description="Remove it even if running.")] = False
    ) -> Done:
        """Remove a sandbox and everything on its disk."""
        await sandboxes.remove(name, force=force)
        return Done(detail=f"removed {name}")

    @tool(READS)
    async def read_file(
        name: Name,
        path: Annotated[str, Field(description="Absolute path in the sandbox.")],
        offset: Offset = 0,
        length: Length = READ_LIMIT,
    ) -> FileContent:
        """Read a file from a sandbox: `length` bytes (at most 1 MiB) from `offset`; next_offset says
        where to read on."""
        info, chunks = await sandboxes.open_file(name, path)
        async with contextlib.aclosing(chunks):
            data = await window(chunks, offset, length + 3)
        encoding, content, taken = text_slice(data, length)
        end = offset + taken
        return FileContent(
            path=path,
            encoding=encoding,
            content=content,
            offset=offset,
            size=info.size,
            next_offset=end if end < info.size else None,
        )

    @tool(hints(read_only=False, destructive=True, idempotent=True, open_world=False))
    async def write_file(
        name: Name,
        path: Annotated[str, Field(description="Absolute path in the sandbox; missing parents are created.")],
        content: Annotated[str, Field(description="The file's new content, encoded as `encoding` says.")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="How content is encoded.")
        ] = "utf-8",
        mode: Annotated[str, Field(pattern=MODE_PATTERN, description=MODE_DESCRIPTION)] = "0644",
    ) -> Done:
        """Write a file in a sandbox, replacing it whole."""
        data = _decode(content, encoding)
        await sandboxes.mkdir(name, posixpath.dirname(path) or "/", parents=True)
        size = await sandboxes.write_file(name, path, _once(data), mode=parse_mode(mode))
        return Done(detail=f"wrote {size} bytes to {path}")

    @tool(READS)
    async def list_files(
        name: Name,
        path: Annotated[str, Field(description="Absolute directory path in the sandbox.")] = "/",
        depth: Annotated[
            int,
            Field(
                description=f"Levels to list: 1 is the directory's own entries; more lists below it "
                f"too, each name its path below `path` (at most {MAX_DEPTH}).",
                ge=1,
                le=MAX_DEPTH,
            ),
        ] = 1,
    ) -> Listing:
        """List a directory in a sandbox, optionally recursively."""
        entries = await sandboxes.list_dir(name, path, depth=depth)
        return Listing(path=path, entries=[Entry.of(e) for e in entries])

    for fn, hinted in file_tools(sandboxes):
        tool(hinted)(fn)
    for fn, hinted in lifecycle_tools(sandboxes, default_lifetime=default_lifetime):
        tool(hinted)(fn)
    for fn, hinted in port_tools(sandboxes):
        tool(hinted)(fn)
    from agentkernel.mcp_server.commands import command_tools  # it builds on this module

    for fn, hinted in command_tools(sandboxes, default_limit):
        tool(hinted)(fn)

    @contextlib.asynccontextmanager
    async def lifespan(_server: MCPServer[None]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sandboxes.close()

    return AgentServer(
        tools, name="agentkernel", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan
    )


def _saved(name: str, path: str, partly: bool, offset: int) -> str:
    first = f"its first {SAVED_LIMIT} bytes are" if partly else "the whole stream is"
    return f'{first} in {path}: read_file(name="{name}", path="{path}", offset={offset}) reads them'


def _not_saved(reason: str, _offset: int) -> str:
    return f"they could not be saved in the sandbox ({for_agent(reason)})"


def _decode(content: str, encoding: str) -> bytes:
    if encoding == "utf-8":
        return content.encode()
    try:
        return base64.b64decode(content, validate=True)
    except ValueError:
        raise AgentkernelError("content: not valid base64") from None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def run(
    transport: Literal["stdio", "http"],
    *,
    host: str,
    port: int,
    project_dir: Path,
    output_limit: int | None = None,
    default_lifetime: float | None = DEFAULT_LIFETIME,
) -> None:
    """Serve until the client goes away (stdio) or until interrupted (http, loopback only).

    Over HTTP, the SDK's streamable-HTTP app is wrapped in the HTTP API's own Host and Origin check
    (`agentkernel.api.guard`), so both servers refuse web pages alike; the SDK's check is turned off.
    """
    server = build_server(project_dir, output_limit=output_limit, default_lifetime=default_lifetime)
    if transport == "stdio":
        server.run("stdio")
        return
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    from agentkernel.api.guard import AllowedHosts, WebGuard
    from agentkernel.network.policy import is_loopback_name

    if not is_loopback_name(host):
        raise AgentkernelError(
            f"refusing to serve MCP on {host}: it has no authentication, so it listens on loopback only"
        )
    app = server.streamable_http_app(
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False), host=host
    )
    uvicorn.run(WebGuard(app, hosts=AllowedHosts.configured(host)), host=host, port=port, log_level="info")
