"""The Python SDK for agentkernel's HTTP API (`agentkernel serve`), sync and async, on httpx.

    from agentkernel.client import Client

    with Client() as ak, ak.create_sandbox(image="python") as box:
        print(box.exec(["python3", "-c", "print(6 * 7)"]).stdout)

Not to be confused with `agentkernel.protocol.client`, the host side of the guest agent's protocol.
"""

from agentkernel.client._common import (
    ApiError,
    Event,
    ExitEvent,
    FileEntry,
    OutputEvent,
    RunResult,
    SandboxInfo,
    Started,
)
from agentkernel.client.aio import AsyncClient, AsyncSandbox, AsyncTerminal
from agentkernel.client.sync import Client, Sandbox, Terminal

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncSandbox",
    "AsyncTerminal",
    "Client",
    "Event",
    "ExitEvent",
    "FileEntry",
    "OutputEvent",
    "RunResult",
    "Sandbox",
    "SandboxInfo",
    "Started",
    "Terminal",
]
