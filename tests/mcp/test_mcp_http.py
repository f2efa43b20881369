"""`agentkernel mcp-server --transport http`: streamable HTTP on loopback, with the SDK's client; web
pages are refused by the same Host and Origin check as the HTTP API's."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from mcp import Client

from tests.api.server import free_port
from tests.conftest import cli
from tests.mcp.test_mcp_server import TOOLS

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


@contextmanager
def mcp_http(tmp_path: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """The URL of a real `agentkernel mcp-server --transport http` listening on `host`."""
    port = free_port()
    log = (tmp_path / "mcp.log").open("wb")
    args = ["mcp-server", "--transport", "http", "--host", host, "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", *args],
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not listening(host, port):
            assert server.poll() is None and time.monotonic() < deadline, "the MCP server did not come up"
            time.sleep(0.1)
        yield f"http://{host}:{port}/mcp"
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def test_streamable_http_on_loopback(isolated_home: Path, tmp_path: Path) -> None:
    async def main(url: str) -> None:
        async with Client(url) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            listed = await client.call_tool("list_sandboxes")
            assert listed.structured_content == {"sandboxes": []}

    with mcp_http(tmp_path) as url:
        asyncio.run(asyncio.wait_for(main(url), 60))


def test_http_transport_refuses_other_addresses(isolated_home: Path) -> None:
    refused = cli("mcp-server", "--transport", "http", "--host", "0.0.0.0")
    assert refused.returncode == 1
    assert b"loopback only" in refused.stderr and b"Traceback" not in refused.stderr


def refused(response: httpx.Response, status: int, code: str) -> None:
    """The API's own problem response: the guard answered, not the SDK."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert (response.json()["status"], response.json()["code"]) == (status, code)


def rpc_result(response: httpx.Response) -> Any:
    """The JSON-RPC result of a streamable-HTTP answer (one server-sent event)."""
    assert response.status_code == 200, response.text
    data = next(line for line in response.text.splitlines() if line.startswith("data: "))
    return json.loads(data.removeprefix("data: "))["result"]


def test_web_pages_are_refused(isolated_home: Path, tmp_path: Path) -> None:
    with mcp_http(tmp_path) as url, httpx.Client(headers=MCP_HEADERS, timeout=30) as http:
        port = httpx.URL(url).port
        for host in ("evil.example", f"evil.example:{port}"):
            refused(http.post(url, json=INITIALIZE, headers={"Host": host}), 421, "host_not_allowed")
        foreign = [
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": "http://localhost:3000"},  # another port: the SDK's own check let it through
            {"Sec-Fetch-Site": "cross-site"},
        ]
        for headers in foreign:
            refused(http.post(url, json=INITIALIZE, headers=headers), 403, "origin_not_allowed")
            refused(http.get(url, headers=headers), 403, "origin_not_allowed")

        same = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
        opened = http.post(url, json=INITIALIZE, headers=same)
        assert rpc_result(opened)["serverInfo"]["name"] == "agentkernel"
        session = {"Mcp-Session-Id": opened.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-06-18"}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert http.post(url, json=initialized, headers=session).status_code == 202

        # A page that got hold of a session still cannot call a tool: the guard answers, no tool runs.
        arguments = {"name": "pwned", "start": False}
        create = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "create_sandbox", "arguments": arguments},
        }
        hijacked = http.post(url, json=create, headers={**session, "Origin": "http://evil.example"})
        refused(hijacked, 403, "origin_not_allowed")
        listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "list_sandboxes"}}
        listed = rpc_result(http.post(url, json=listing, headers=session))
        assert listed["structuredContent"] == {"sandboxes": []}


def test_any_loopback_address_is_guarded(isolated_home: Path, tmp_path: Path) -> None:
    """The SDK turned its check off for a loopback address other than 127.0.0.1 (say 127.0.0.2);
    the shared check guards every address."""
    with mcp_http(tmp_path, host="127.0.0.2") as url, httpx.Client(headers=MCP_HEADERS, timeout=30) as http:
        refused(http.post(url, json=INITIALIZE, headers={"Host": "evil.example"}), 421, "host_not_allowed")
        refused(
            http.post(url, json=INITIALIZE, headers={"Origin": "http://evil.example"}),
            403,
            "origin_not_allowed",
        )
        assert rpc_result(http.post(url, json=INITIALIZE))["serverInfo"]["name"] == "agentkernel"
