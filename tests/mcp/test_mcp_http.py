"""`agentkernel mcp-server --transport http`: streamable HTTP on loopback, with the SDK's client."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mcp import Client

from tests.api.server import free_port
from tests.conftest import cli


def test_streamable_http_on_loopback(isolated_home: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "mcp.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "mcp-server", "--transport", "http", "--port", str(port)],
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    async def main() -> None:
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            assert len((await client.list_tools()).tools) == 10
            listed = await client.call_tool("list_sandboxes")
            assert listed.structured_content == {"sandboxes": []}

    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            assert server.poll() is None and time.monotonic() < deadline, "the MCP server did not come up"
            time.sleep(0.1)
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_http_transport_refuses_other_addresses(isolated_home: Path) -> None:
    refused = cli("mcp-server", "--transport", "http", "--host", "0.0.0.0")
    assert refused.returncode == 1
    assert b"loopback only" in refused.stderr and b"Traceback" not in refused.stderr
