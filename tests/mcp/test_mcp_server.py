"""`agentkernel mcp-server` over stdio, driven by the MCP SDK's own client, against real sandboxes."""

from __future__ import annotations

import asyncio
import os
import re
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
    "stat_path",
    "make_directory",
    "move_path",
    "remove_path",
    "watch_directory",
    "get_output",
    "start_command",
    "list_commands",
    "read_command_output",
    "send_command_input",
    "kill_command",
    "wait_command",
    "set_sandbox_timeout",
    "pause_sandbox",
    "resume_sandbox",
    "snapshot_sandbox",
    "list_snapshots",
    "fork_snapshot",
    "remove_snapshot",
    "expose_port",
}


def with_server(body: Callable[[Client], Awaitable[None]], cwd: Path, *args: str) -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agentkernel", "mcp-server", *args],
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
        assert "exec: /no/such/program: no such file" in not_found
        assert "Traceback" not in missing + escape + not_found

    with_server(body, tmp_path)


SEQ = b"".join(b"%d\n" % i for i in range(1, 300001))
MARKER = re.compile(r"\n\[\.\.\. (\d+) bytes \((\d+) lines\) left out: (.*) \.\.\.\]\n")


def test_long_output_is_head_and_tail_and_kept(cli_home: Path, tmp_path: Path) -> None:  # noqa: F811
    async def body(client: Client) -> None:
        result = await client.call_tool("run_command", {"command": "seq 1 300000"})
        ran = ok(result)
        stdout = ran["stdout"]
        assert ran["stdout_truncated"] and not ran["stderr_truncated"]
        assert ran["stdout_bytes"] == len(SEQ) and ran["stderr"] == ""
        marker = MARKER.search(stdout)
        assert marker is not None, stdout[:200]
        head, tail = stdout[: marker.start() + 1], stdout[marker.end() :]
        assert len(head) + len(tail) <= 16 << 10
        assert SEQ.startswith(head.encode()) and SEQ.endswith(tail.encode())
        assert head.endswith("\n") and SEQ[-len(tail) - 1 : -len(tail)] == b"\n"  # whole lines
        assert int(marker[1]) == len(SEQ) - len(head) - len(tail)
        assert int(marker[2]) == SEQ.count(b"\n") - head.count("\n") - tail.count("\n")
        assert f'output_id="{ran["output_id"]}"' in marker[3] and f"offset={len(head)}" in marker[3]
        # the text is a summary line and the same bounded output, for clients that read only text
        text = text_of(result)
        assert len(result.content) == 1 and len(text) < (16 << 10) + 300
        assert text.splitlines()[0].startswith("exit code 0; stdout ") and stdout in text

        whole, offset = b"", 0
        while offset is not None:
            piece = ok(
                await client.call_tool(
                    "get_output", {"output_id": ran["output_id"], "stream": "stdout", "offset": offset}
                )
            )
            assert piece["encoding"] == "utf-8" and piece["complete"]
            whole += piece["content"].encode()
            offset = piece["next_offset"]
        assert whole == SEQ
        gone = error_text(await client.call_tool("get_output", {"output_id": "nope"}))
        assert "run the command again" in gone

        short = ok(await client.call_tool("run_command", {"command": "echo hi"}))
        assert (short["stdout"], short["stdout_truncated"], short["output_id"]) == ("hi\n", False, None)

    with_server(body, tmp_path)


def test_exec_output_saved_in_the_sandbox(cli_home: Path, tmp_path: Path) -> None:  # noqa: F811
    """The server's --output-limit applies unless a call asks for another; the whole of each cut
    stream is a file in the sandbox that read_file reads in pieces."""

    async def body(client: Client) -> None:
        ok(await client.call_tool("create_sandbox", {"name": "outbox", "image": "base"}))
        command = "seq 1 300000; seq 1 300000 >&2"
        ran = ok(await client.call_tool("exec_in_sandbox", {"name": "outbox", "command": command}))
        for stream in ("stdout", "stderr"):
            marker = MARKER.search(ran[stream])
            assert marker is not None and len(ran[stream]) - len(marker[0]) <= 4096
            path = ran[f"{stream}_file"]
            assert path.startswith("/tmp/agentkernel-output/") and path.endswith(f".{stream}")
            assert f'path="{path}"' in marker[3]
            whole, offset = b"", 0
            while offset is not None:
                args = {"name": "outbox", "path": path, "offset": offset, "length": 500_000}
                piece = ok(await client.call_tool("read_file", args))
                assert piece["size"] == len(SEQ) and piece["offset"] == offset
                whole += piece["content"].encode()
                offset = piece["next_offset"]
            assert whole == SEQ

        small = ok(
            await client.call_tool(
                "exec_in_sandbox", {"name": "outbox", "command": "seq 1 3000", "output_limit": 1024}
            )
        )
        marker = MARKER.search(small["stdout"])
        assert marker is not None and len(small["stdout"]) - len(marker[0]) <= 1024
        assert small["stderr_file"] is None
        ok(await client.call_tool("remove_sandbox", {"name": "outbox", "force": True}))

    with_server(body, tmp_path, "--output-limit", "4096")


def test_tools_describe_themselves_and_refuse_unknown_arguments(cli_home: Path, tmp_path: Path) -> None:  # noqa: F811
    async def body(client: Client) -> None:
        for tool in (await client.list_tools()).tools:
            hints = tool.annotations
            assert hints is not None, tool.name
            flags = (
                hints.read_only_hint,
                hints.destructive_hint,
                hints.idempotent_hint,
                hints.open_world_hint,
            )
            assert None not in flags, tool.name
            schema = tool.input_schema
            assert schema.get("additionalProperties") is False, tool.name
            undescribed = [
                p for p, spec in schema.get("properties", {}).items() if not spec.get("description")
            ]
            assert undescribed == [], (tool.name, undescribed)
        listed = {t.name: t.annotations for t in (await client.list_tools()).tools}
        assert listed["read_file"] is not None and listed["read_file"].read_only_hint
        assert listed["remove_sandbox"] is not None and listed["remove_sandbox"].destructive_hint

        typo = error_text(
            await client.call_tool("exec_in_sandbox", {"name": "x", "command": "true", "timout": 5})
        )
        assert "'timout' is not an argument of exec_in_sandbox (did you mean 'timeout'?)" in typo
        bad = error_text(
            await client.call_tool("run_command", {"command": 5, "timeout": -1, "output_limit": 1})
        )
        assert "'command' should be a valid list or a valid string (got 5)." in bad
        assert "'timeout' should be greater than 0 (got -1)." in bad
        assert "'output_limit' should be greater than or equal to 256" in bad
        missing = error_text(await client.call_tool("read_file", {"name": "x"}))
        assert "'path' is required." in missing
        ghost = error_text(await client.call_tool("exec_in_sandbox", {"name": "ghost", "command": "true"}))
        assert "list_sandboxes" in ghost
        image = error_text(await client.call_tool("create_sandbox", {"image": "nope"}))
        assert "no image named nope" in image
        for text in (typo, bad, missing, ghost, image):
            assert "pydantic" not in text and "https://" not in text and "\n" not in text, text
            assert "agentkernel " not in text and "`" not in text and "Traceback" not in text, text

    with_server(body, tmp_path)


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text
