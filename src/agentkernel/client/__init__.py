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
    OutputEvent,
    RunResult,
    SandboxInfo,
    Started,
)
from agentkernel.client.aio import AsyncClient, AsyncSandbox, AsyncTerminal, Opening
from agentkernel.client.sync import Client, Sandbox, Terminal

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncSandbox",
    "AsyncTerminal",
    "Client",
    "ClientConnectionError",
    "ClientError",
    "Event",
    "ExitEvent",
    "FileEntry",
    "Opening",
    "OutputEvent",
    "RunResult",
    "Sandbox",
    "SandboxInfo",
    "Started",
    "Terminal",
]
