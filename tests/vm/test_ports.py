"""Ports on real sandboxes: a server in the guest (busybox `nc`) reached from the host through each
face (the CLI in subprocesses, the SDK sync and async against a real server, MCP over stdio), the
profile's refusal, a port with nothing behind it, and the relay's end with its sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from mcp import Client as McpClient

from agentkernel import procs
from agentkernel.client import AsyncClient, Client
from tests.api.server import api_server, free_port
from tests.conftest import cli, wait_gone
from tests.mcp.test_mcp_server import ok as mcp_ok
from tests.mcp.test_mcp_server import with_server

pytestmark = pytest.mark.vm
UPPER = ["nc", "-ll", "-p", "{port}", "-e", "tr", "a-z", "A-Z"]
"""A guest server that answers each connection with what it read, upper-cased (busybox nc)."""


def ok(*args: str) -> bytes:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def serve_upper(box: str, port: int) -> None:
    ok("exec", "-d", box, "--", *[a.format(port=port) for a in UPPER])


def exchange(address: str, data: bytes, *, timeout: float = 30) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        return got


def eventually(address: str, data: bytes, timeout: float = 30) -> bytes:
    """`exchange` once the guest's server listens (until then each connection is reset)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return exchange(address, data)
        except (ConnectionResetError, BrokenPipeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def relay_of(box: str) -> int:
    [pid] = [
        p
        for p in procs.naming("agentkernel.service.port_relay")
        if f"--sandbox\0{box}\0".encode() in b"\0".join(procs.argv(p))
    ]
    return pid


def test_cli_port_and_the_relays_end(cli_home: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    serve_upper("box", 9000)
    address = ok("port", "box", "9000").decode().strip()
    assert address.startswith("127.0.0.1:")
    assert eventually(address, b"through the guest's loopback\n") == b"THROUGH THE GUEST'S LOOPBACK\n"
    assert ok("port", "box", "9000").decode().strip() == address  # the same forward again
    big = os.urandom(3 << 20).hex().encode()  # 6 MiB: many windows each way
    assert exchange(address, big) == big.upper()

    # Nothing listens on 9001 yet: each connection is reset, the listener stays for a later server.
    empty = ok("port", "box", "9001").decode().strip()
    for _ in range(2):
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            exchange(empty, b"anyone?")
    serve_upper("box", 9001)
    assert eventually(empty, b"now\n") == b"NOW\n"
    listed = json.loads(ok("port", "box", "--json"))
    assert {(p["guest_port"], f"{p['host']}:{p['port']}") for p in listed} == {(9000, address), (9001, empty)}

    relay = relay_of("box")
    ok("stop", "box")
    assert wait_gone(relay, 20), "the relay outlived its stopped sandbox"
    with pytest.raises(ConnectionRefusedError):
        exchange(address, b"late", timeout=5)

    ok("start", "box")  # a new run has no forwards until asked; then a new relay serves them
    serve_upper("box", 9000)
    again = ok("port", "box", "9000").decode().strip()
    assert eventually(again, b"again\n") == b"AGAIN\n"
    relay = relay_of("box")
    [record] = [r for r in json.loads(ok("list", "--json")) if r["name"] == "box"]
    os.kill(record["pid"], signal.SIGKILL)  # the VMM dies under everyone's feet
    assert wait_gone(relay, 20), "the relay outlived its VMM"


def test_restrictive_refuses(cli_home: Path) -> None:
    ok("create", "tight", "--profile", "restrictive")
    ok("start", "tight")
    result = cli("port", "tight", "9000")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "agentkernel: error: sandbox 'tight' runs under the restrictive profile, which forwards no "
        'ports (security.ports = "off")\n'
    )
    assert not [p for p in procs.naming("agentkernel.service.port_relay") if b"tight" in procs.argv(p)]


def test_sdk_and_mcp(cli_home: Path, tmp_path: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    serve_upper("box", 8000)
    with api_server(tmp_path) as url, Client(url) as ak:
        box = ak.sandbox("box")
        address = box.get_host(8000)
        assert eventually(address, b"sync sdk\n") == b"SYNC SDK\n"

        async def main() -> str:
            async with AsyncClient(url) as aio:
                return await (await aio.sandbox("box")).get_host(8000)

        assert asyncio.run(main()) == address

    async def body(client: McpClient) -> None:
        exposed = mcp_ok(await client.call_tool("expose_port", {"name": "box", "port": 8000}))
        got = await asyncio.to_thread(exchange, f"{exposed['host']}:{exposed['port']}", b"mcp\n")
        assert got == b"MCP\n"

    with_server(body, tmp_path)


def test_run_publish(cli_home: Path) -> None:
    host_port = free_port()
    answers: list[bytes] = []

    def client() -> None:  # once the sandbox is up and its server listens
        deadline = time.monotonic() + 120
        while not answers and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                answers.append(exchange(f"127.0.0.1:{host_port}", b"run -p\n"))
            time.sleep(0.2)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        result = cli(
            "run", "-p", f"{host_port}:7000", "--", "nc", "-l", "-p", "7000", "-e", "tr", "a-z", "A-Z"
        )
    finally:
        thread.join(150)
    assert (result.returncode, answers) == (0, [b"RUN -P\n"]), result.stderr.decode()
    with pytest.raises(ConnectionRefusedError):  # the sandbox is gone, and its relay with it
        exchange(f"127.0.0.1:{host_port}", b"late", timeout=5)


def test_a_flooding_guest_cannot_grow_the_relay(cli_home: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    ok("exec", "-d", "box", "--", "sh", "-c", "yes flood | nc -l -p 9100")
    address = ok("port", "box", "9100").decode().strip()
    relay = relay_of("box")
    before = _rss_kib(relay)
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + 30
    while True:  # until the guest's server listens and sends
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            with contextlib.suppress(ConnectionResetError):
                if conn.recv(1024):
                    time.sleep(5)  # it floods meanwhile; nobody reads
                    after = _rss_kib(relay)
                    break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert after - before < 32 * 1024, f"the relay grew from {before} to {after} KiB"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
