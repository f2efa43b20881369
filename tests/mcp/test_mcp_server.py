"""`agentkernel mcp-server` over stdio, driven by the MCP SDK's own client, against real sandboxes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult, TextContent

from tests.vm.conftest import artifacts, cli_home  # noqa: F401  (fixtures)

pytestmark = pytest.mark.vm

TOOLS = {
    "run_command",
    "create_sandbox",
    "exec_in_sandbox",
    "list_sandboxes",
    "start_sandbox",
    "stop_sandbox",
    "remove_sandbox",
    "read_file",
    "write_file",
    "list_files",
}


def with_server(body: Callable[[Client], Awaitable[None]], cwd: Path) -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agentkernel", "mcp-server"],
        env={"AGENTKERNEL_HOME": os.environ["AGENTKERNEL_HOME"]},
        cwd=cwd,
    )

    async def main() -> None:
        async with Client(server) as client:
            await body(client)

    asyncio.run(asyncio.wait_for(main(), 300))


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def test_tools_over_stdio(cli_home: Path, tmp_path: Path) -> None:  # noqa: F811
    async def body(client: Client) -> None:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        exec_schema = next(t for t in listed.tools if t.name == "exec_in_sandbox").input_schema
        assert {"name", "command", "cwd", "env", "timeout"} <= exec_schema["properties"].keys()

        ran = ok(
            await client.call_tool(
                "run_command", {"command": "echo $A in $PWD", "env": {"A": "x"}, "cwd": "/tmp"}
            )
        )
        assert (ran["exit_code"], ran["stdout"]) == (0, "x in /tmp\n")
        assert ok(await client.call_tool("list_sandboxes"))["sandboxes"] == []

        box = ok(await client.call_tool("create_sandbox", {"name": "mcpbox", "image": "base"}))
        assert box["status"] == "running"
        done = ok(
            await client.call_tool(
                "exec_in_sandbox",
                {
                    "name": "mcpbox",
                    "command": ["sh", "-c", "echo $B; pwd; echo oops >&2; exit 2"],
                    "env": {"B": "y"},
                    "cwd": "/root",
                },
            )
        )
        assert (done["exit_code"], done["stdout"], done["stderr"]) == (2, "y\n/root\n", "oops\n")
        start = time.monotonic()
        slow = ok(
            await client.call_tool("exec_in_sandbox", {"name": "mcpbox", "command": "sleep 30", "timeout": 1})
        )
        assert slow["timed_out"] and time.monotonic() - start < 20

        wrote = ok(
            await client.call_tool(
                "write_file", {"name": "mcpbox", "path": "/root/a/b.txt", "content": "hello\n"}
            )
        )
        assert "6 bytes" in wrote["detail"]
        assert (
            ok(await client.call_tool("read_file", {"name": "mcpbox", "path": "/root/a/b.txt"}))["content"]
            == "hello\n"
        )
        binary = ok(
            await client.call_tool(
                "write_file", {"name": "mcpbox", "path": "/root/bin", "content": "/wA=", "encoding": "base64"}
            )
        )
        assert "2 bytes" in binary["detail"]
        read_back = ok(await client.call_tool("read_file", {"name": "mcpbox", "path": "/root/bin"}))
        assert (read_back["encoding"], read_back["content"]) == ("base64", "/wA=")
        entries = ok(await client.call_tool("list_files", {"name": "mcpbox", "path": "/root"}))["entries"]
        assert {e["name"]: e["kind"] for e in entries} == {"a": "dir", "bin": "file"}

        assert ok(await client.call_tool("stop_sandbox", {"name": "mcpbox"}))["status"] == "stopped"
        assert "not running" in error_text(
            await client.call_tool("exec_in_sandbox", {"name": "mcpbox", "command": "true"})
        )
        assert ok(await client.call_tool("start_sandbox", {"name": "mcpbox"}))["status"] == "running"
        assert (
            ok(await client.call_tool("read_file", {"name": "mcpbox", "path": "/root/a/b.txt"}))["content"]
            == "hello\n"
        )

        assert "is running" in error_text(await client.call_tool("remove_sandbox", {"name": "mcpbox"}))
        ok(await client.call_tool("remove_sandbox", {"name": "mcpbox", "force": True}))
        assert ok(await client.call_tool("list_sandboxes"))["sandboxes"] == []

    with_server(body, tmp_path)


def test_failures_are_tool_errors(cli_home: Path, tmp_path: Path) -> None:  # noqa: F811
    async def body(client: Client) -> None:
        missing = error_text(await client.call_tool("exec_in_sandbox", {"name": "ghost", "command": "true"}))
        assert "no sandbox named 'ghost'" in missing
        escape = error_text(await client.call_tool("read_file", {"name": "ghost", "path": "/etc/../x"}))
        assert "'..'" in escape
        assert "image" in error_text(
            await client.call_tool("run_command", {"command": "true", "image": "nope"})
        )
        assert "cwd" in error_text(
            await client.call_tool("run_command", {"command": "true", "cwd": "relative"})
        )
        assert "timeout" in error_text(
            await client.call_tool("run_command", {"command": "true", "timeout": -1})
        )
        not_found = error_text(await client.call_tool("run_command", {"command": ["/no/such/program"]}))
        assert "No such file" in not_found
        assert "Traceback" not in missing + escape + not_found

    with_server(body, tmp_path)
