"""A `POST /run` whose client goes away ends its command and removes its sandbox; sandboxes of a
server that died are removed by the next one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agentkernel.client import AsyncClient
from agentkernel.sandbox import state
from agentkernel.service import audit
from tests.api.server import api_server, free_port
from tests.vm.test_owners import GRACEFUL, REAPED, vmm_alive, vmm_pids, wait_until

pytestmark = pytest.mark.vm

BODY = {"command": ["sleep", "100000"], "image": "base", "profile": "restrictive"}


def post_run(url: str) -> socket.socket:
    """A `POST /run` sent on a connection of its own, left waiting for the answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port))
    body = json.dumps(BODY).encode()
    head = (
        f"POST /run HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def running(count: int) -> list[tuple[str, int]]:
    """Waits until `count` sandboxes have booted (their command starts right after); their names
    and VMM pids."""

    def ready() -> bool:
        records = state.all_records()
        return len(records) == count and all(r.status == "running" and booted(r.name) for r in records)

    wait_until(ready, 180, f"{count} sandboxes running")
    time.sleep(0.5)
    return [(r.name, r.pid) for r in state.all_records() if r.pid is not None]


def booted(name: str) -> bool:
    return any(e["event"] == "start" and e.get("ok") for e in audit.entries(name))


def all_gone(sandboxes: list[tuple[str, int]]) -> bool:
    return not any(vmm_alive(pid) or state.exists(name) for name, pid in sandboxes)


def test_run_is_cancelled_when_the_client_disconnects(api: str) -> None:
    sock = post_run(api)
    sandboxes = running(1)
    sock.close()
    took = wait_until(lambda: all_gone(sandboxes), GRACEFUL, "the sandbox gone after the disconnect")
    print(f"POST /run, client closed the connection: VM gone after {took:.2f}s")


def test_a_client_that_leaves_during_the_boot_does_not_wait_for_it(api: str) -> None:
    sock = post_run(api)
    wait_until(lambda: bool(state.all_records()), 180, "the sandbox to be made")
    time.sleep(0.3)  # booting now
    (record,) = state.all_records()
    sock.close()
    took = wait_until(lambda: not state.all_records(), GRACEFUL, "the sandbox gone after the disconnect")
    assert record.pid is None or not vmm_alive(record.pid)
    assert not vmm_pids(Path(os.environ["AGENTKERNEL_HOME"]))
    print(f"POST /run, client closed the connection during the boot: sandbox gone after {took:.2f}s")


def test_cancelling_async_client_run_removes_the_sandbox(api: str) -> None:
    async def scenario() -> float:
        async with AsyncClient(api) as client:
            task = asyncio.create_task(client.run(["sleep", "100000"], image="base", profile="restrictive"))
            sandboxes = await asyncio.to_thread(running, 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await asyncio.to_thread(
                wait_until, lambda: all_gone(sandboxes), GRACEFUL, "the sandbox gone after the cancel"
            )

    took = asyncio.run(scenario())
    print(f"AsyncClient.run cancelled: VM gone after {took:.2f}s")


def test_a_new_server_removes_what_a_killed_server_left(cli_home: Path, tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "killed.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "agentkernel", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=os.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 30, "the server to come up")
        socks = [post_run(url) for _ in range(2)]
        sandboxes = running(2)
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed = time.monotonic()
        time.sleep(1)
        assert not all_gone(sandboxes) and all(vmm_alive(pid) for _, pid in sandboxes)
        for sock in socks:
            sock.close()
        with api_server(tmp_path):
            wait_until(lambda: all_gone(sandboxes), REAPED, "the new server to remove them")
            print(f"serve SIGKILLed with 2 runs: VMs gone {time.monotonic() - killed:.2f}s after the kill")
        assert not vmm_pids(cli_home)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.port is not None
    try:
        with socket.create_connection(("127.0.0.1", parts.port), timeout=1):
            return True
    except OSError:
        return False


def test_a_stopping_server_removes_the_sandboxes_of_its_runs(cli_home: Path, tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "stopped.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "agentkernel", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=os.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}"), 30, "the server to come up")
        sock = post_run(f"http://127.0.0.1:{port}")
        sandboxes = running(1)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)  # it lets the request run for a while, then cancels it
        assert all_gone(sandboxes)
        sock.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
