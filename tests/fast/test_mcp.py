"""The MCP server's tools, driven by the MCP SDK's own client in-process, on the fake backend."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mcp import Client

from agentkernel.mcp_server.server import build_server
from tests.mcp.test_mcp_server import TOOLS, error_text, ok


def with_server(body: Callable[[Client], Awaitable[None]], project: Path, **options: Any) -> None:
    async def main() -> None:
        async with Client(build_server(project, **options)) as client:
            await body(client)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_sandbox_tools(tmp_path: Path) -> None:
    async def body(client: Client) -> None:
        assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
        ran = ok(
            await client.call_tool(
                "run_command", {"command": "echo $A in $PWD", "env": {"A": "x"}, "cwd": "/tmp"}
            )
        )
        assert (ran["exit_code"], ran["stdout"]) == (0, "x in /tmp\n")
        assert ok(await client.call_tool("list_sandboxes"))["sandboxes"] == []  # run_command removed its own

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
        slow = ok(
            await client.call_tool(
                "exec_in_sandbox", {"name": "mcpbox", "command": "sleep 30", "timeout": 0.2}
            )
        )
        assert slow["timed_out"]

        wrote = ok(
            await client.call_tool(
                "write_file", {"name": "mcpbox", "path": "/root/a/b.txt", "content": "hello\n"}
            )
        )
        assert "6 bytes" in wrote["detail"]
        read = ok(await client.call_tool("read_file", {"name": "mcpbox", "path": "/root/a/b.txt"}))
        assert read["content"] == "hello\n"
        entries = ok(await client.call_tool("list_files", {"name": "mcpbox", "path": "/root"}))["entries"]
        assert {e["name"]: e["kind"] for e in entries} == {"a": "dir"}

        assert ok(await client.call_tool("stop_sandbox", {"name": "mcpbox"}))["status"] == "stopped"
        assert "not running" in error_text(
            await client.call_tool("exec_in_sandbox", {"name": "mcpbox", "command": "true"})
        )
        assert ok(await client.call_tool("start_sandbox", {"name": "mcpbox"}))["status"] == "running"
        assert "is running" in error_text(await client.call_tool("remove_sandbox", {"name": "mcpbox"}))
        ok(await client.call_tool("remove_sandbox", {"name": "mcpbox", "force": True}))
        assert ok(await client.call_tool("list_sandboxes"))["sandboxes"] == []

    with_server(body, tmp_path)


def test_long_output_is_kept_for_get_output(tmp_path: Path) -> None:
    async def body(client: Client) -> None:
        ran = ok(await client.call_tool("run_command", {"command": "emit 5000"}))
        assert ran["stdout_truncated"] and ran["output_id"]
        whole = ok(await client.call_tool("get_output", {"output_id": ran["output_id"], "length": 10000}))
        assert (whole["content"], whole["complete"]) == ("y" * 5000, True)

        ok(await client.call_tool("create_sandbox", {"name": "big"}))
        done = ok(await client.call_tool("exec_in_sandbox", {"name": "big", "command": "emit 5000"}))
        saved = done["stdout_file"]
        read = ok(await client.call_tool("read_file", {"name": "big", "path": saved}))
        assert read["content"] == "y" * 5000

    with_server(body, tmp_path, output_limit=1000)


def test_failures_are_tool_errors(tmp_path: Path) -> None:
    async def body(client: Client) -> None:
        missing = error_text(await client.call_tool("exec_in_sandbox", {"name": "ghost", "command": "true"}))
        assert "no sandbox named 'ghost'" in missing
        assert "image" in error_text(
            await client.call_tool("run_command", {"command": "true", "image": "nope"})
        )
        ok(await client.call_tool("create_sandbox", {"name": "box"}))
        assert "box" in error_text(await client.call_tool("create_sandbox", {"name": "box"}))
        gone = error_text(await client.call_tool("read_file", {"name": "box", "path": "/no/such/file"}))
        assert "No such file" in gone

    with_server(body, tmp_path)
