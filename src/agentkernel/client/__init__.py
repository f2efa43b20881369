"""The Python SDK for agentkernel's HTTP API (`agentkernel serve`), sync and async, on httpx.

    from agentkernel.client import Client

    with Client() as ak, ak.create_sandbox(image="python") as box:
        print(box.exec(["python3", "-c", "print(6 * 7)"]).stdout)

Errors are ClientError: ApiError when the server refuses a request, ClientConnectionError (also a
builtin ConnectionError) when it cannot be reached or the connection fails midway.

Not to be confused with `agentkernel.protocol.connection`, the host side of the guest agent's protocol.
"""

from agentkernel.client._common import (
    ApiError,
    ClientConnectionError,
    ClientError,
    Event,
    ExitEvent,
    FileEntry,
    FileEvent,
    OutputEvent,
    RunResult,
    SandboxInfo,
    SnapshotInfo,
    Started,
)
from agentkernel.client.aio import AsyncClient, AsyncSandbox, AsyncTerminal, Opening
from agentkernel.client.commands import AsyncCommandHandle, CommandHandle, CommandInfo, CommandOutput
from agentkernel.client.files import AsyncFiles, AsyncFileWatch, Files, FileWatch
from agentkernel.client.sync import Client, Sandbox, Terminal

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncCommandHandle",
    "AsyncFileWatch",
    "AsyncFiles",
    "AsyncSandbox",
    "AsyncTerminal",
    "Client",
    "ClientConnectionError",
    "ClientError",
    "CommandHandle",
    "CommandInfo",
    "CommandOutput",
    "Event",
    "ExitEvent",
    "FileEntry",
    "FileEvent",
    "FileWatch",
    "Files",
    "Opening",
    "OutputEvent",
    "RunResult",
    "Sandbox",
    "SandboxInfo",
    "SnapshotInfo",
    "Started",
    "Terminal",
]
