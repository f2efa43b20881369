"""Request and response bodies. Requests forbid unknown fields, so a typo is an error, not ignored."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agentkernel.config import MEMORY_MB_RANGE, VCPUS_RANGE, ProfileName
from agentkernel.protocol.connection import FileInfo
from agentkernel.service.checks import MAX_TIMEOUT, NAME_RE
from agentkernel.service.files import MODE_DESCRIPTION, format_mode
from agentkernel.service.service import Collected

SandboxName = Annotated[str, Field(pattern=f"^{NAME_RE.pattern}$", examples=["box"])]
Command = Annotated[list[str], Field(min_length=1, examples=[["python3", "-c", "print(1)"]])]
Timeout = Annotated[
    float, Field(description=f"Kill the command after this many seconds (at most {MAX_TIMEOUT:g}).")
]
Vcpus = Annotated[int, Field(description=f"Virtual CPUs, {VCPUS_RANGE[0]} to {VCPUS_RANGE[1]}.")]
MemoryMb = Annotated[int, Field(description=f"Memory in MB, {MEMORY_MB_RANGE[0]} to {MEMORY_MB_RANGE[1]}.")]
Pairs = Annotated[dict[str, str], Field(max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExecRequest(_Request):
    command: Command
    env: dict[str, str] | None = None
    cwd: str | None = Field(None, description="Working directory in the sandbox (absolute).")
    timeout: Timeout | None = None
    stdin: str | None = Field(None, max_length=1 << 20, description="Text given to the command's stdin.")


SecretNames = Annotated[
    tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")], ...],
    Field(
        max_length=32,
        description="Secrets the server holds (its agentkernel.toml [secrets] or secret store) to give "
        "the sandbox: it sees placeholders, the server's egress gateway sends the values to each "
        "secret's hosts only (docs/secrets.md).",
    ),
]


class ExecInSandboxRequest(ExecRequest):
    background: bool = Field(
        False,
        description="Start the command detached and answer at once (201) with its id: it runs on "
        "after this request, as one started by POST /sandboxes/{name}/commands, except that its "
        "stdin is `stdin` and then closed, as for a command run in the foreground.",
    )


class Started(BaseModel):
    id: int = Field(description="The command's id in its sandbox (for the /commands routes).")
    pid: int


class RunRequest(ExecRequest):
    image: str | None = Field(None, description="Image (default: agentkernel.toml, else detected).")
    profile: ProfileName | None = None
    vcpus: Vcpus | None = None
    memory_mb: MemoryMb | None = None
    secrets: SecretNames = ()


class CreateRequest(_Request):
    name: SandboxName | None = Field(None, description="Default: sandbox-XXXXXXXX.")
    image: str | None = None
    profile: ProfileName | None = None
    vcpus: Vcpus | None = None
    memory_mb: MemoryMb | None = None
    secrets: SecretNames = ()
    env: Pairs | None = Field(
        None, description="Set for every command in the sandbox (a command's own wins)."
    )
    labels: Pairs | None = Field(
        None, description="Kept with the sandbox; GET /sandboxes?label=k=v finds it."
    )
    start: bool = Field(True, description="Boot it as well.")
    timeout: float | None = Field(
        None,
        ge=0,
        description="Lifetime in seconds: it is stopped this long after each start (default: the "
        "server's, `serve --default-lifetime`; 0: none). POST /sandboxes/{name}/timeout changes it.",
    )


class RunResult(BaseModel):
    exit_code: int | None = Field(description="None when the command was killed by a signal.")
    signal: int | None
    timed_out: bool
    stdout: str = Field(description="UTF-8 text; invalid bytes are replaced.")
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: int

    @classmethod
    def of(cls, result: Collected) -> RunResult:
        return cls(
            exit_code=result.status.exit_code,
            signal=result.status.signal,
            timed_out=result.status.timed_out,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            duration_ms=round(result.duration * 1000),
        )


class FileEntry(BaseModel):
    name: str = Field(description="The entry's name; in a recursive listing, its path below the directory.")
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str = Field(description=MODE_DESCRIPTION, examples=["0644"])
    mtime_ns: int

    @classmethod
    def of(cls, info: FileInfo) -> FileEntry:
        return cls.model_validate({**dataclasses.asdict(info), "mode": format_mode(info.mode)})


class DirListing(BaseModel):
    path: str
    entries: list[FileEntry]


class Written(BaseModel):
    path: str
    size: int


class Health(BaseModel):
    status: Literal["ok"]
    version: str
