"""What one sandbox can take of the shared gateway process: its lookups and DNS connections are
capped, so another sandbox's lookups still answer; a sandbox whose VMM died is forgotten; the
process's fd limit is raised; a gateway spawned by the launcher is never left a zombie."""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentkernel.errors import AgentkernelError
from agentkernel.network import dns, gateway, launcher
from agentkernel.network.dns import Resolver
from agentkernel.network.gateway import Gateway
from agentkernel.network.policy import EgressRules
from tests.network.test_dns import answers, query
from tests.network.test_shared_gateway import DEFAULT, gateway_home, rundir  # noqa: F401

PUBLIC = "93.184.216.34"


class SlowResolver:
    """Stands in for the host's getaddrinfo: names starting with "never" block until released (a
    name server that never answers), any other answers PUBLIC at once. Counts blocked lookups."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.blocked = self.most_blocked = 0

    def __call__(self, host: bytes, port: int, *args: Any) -> list[Any]:
        if host.startswith(b"never"):
            with self.lock:
                self.blocked += 1
                self.most_blocked = max(self.most_blocked, self.blocked)
            self.release.wait(30)
            with self.lock:
                self.blocked -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "no answer")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))]


@pytest.fixture
def slow_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowResolver]:
    fake = SlowResolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.release.set()


async def dns_server(tmp_path: Path, name: str) -> tuple[asyncio.Server, Path]:
    path = tmp_path / f"{name}.sock"
    gw = Gateway(name, EgressRules())
    return await asyncio.start_unix_server(Resolver(gw.dns_lookup).handle, path=str(path)), path


async def send_query(path: Path, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    message = query(name)
    writer.write(struct.pack(">H", len(message)) + message)
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    size = struct.unpack(">H", await reader.readexactly(2))[0]
    return await reader.readexactly(size)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closed the connection (reset, if it left the query unread)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


def test_a_flood_of_unanswered_lookups_leaves_another_sandbox_its_lookups(
    isolated_home: Path, tmp_path: Path, slow_resolver: SlowResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "RESOLVE_TIMEOUT", 5.0)  # still longer than B is given to answer

    async def scenario() -> None:
        server_a, sock_a = await dns_server(tmp_path, "sb-a")
        server_b, sock_b = await dns_server(tmp_path, "sb-b")
        flood = [await send_query(sock_a, f"never{i}.example") for i in range(dns.MAX_CONNECTIONS)]
        try:
            await asyncio.sleep(0.5)  # A's lookups are under way
            reader, writer = await send_query(sock_b, "fast.example")
            reply = await asyncio.wait_for(read_answer(reader), 3.0)
            writer.close()
            assert answers(reply) == (0, [PUBLIC])
            # A holds no more lookup threads than its share, and no more DNS connections.
            assert slow_resolver.most_blocked == gateway.MAX_LOOKUPS
            extra_reader, extra = await send_query(sock_a, "never.example")
            assert await asyncio.wait_for(closed(extra_reader), 3.0)
            extra.close()
        finally:
            slow_resolver.release.set()
        for r, w in flood:  # once the name server "answers", A's queries are answered, refused
            assert answers(await asyncio.wait_for(read_answer(r), 30.0)) == (dns.REFUSED, [])
            w.close()
        for server in (server_a, server_b):
            server.close()

    asyncio.run(scenario())


def test_a_sandbox_whose_vmm_died_without_a_stop_is_withdrawn(
    gateway_home: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    vmm = subprocess.Popen(["sleep", "60"])
    try:
        launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
        launcher.start("sb-b", DEFAULT, rundir(tmp_path, "b"))
        launcher.watch("sb-a", vmm.pid)
        vmm.kill()  # not reaped yet: a zombie is no VMM either
        deadline = time.monotonic() + 10
        while (status := launcher.status()) is not None and status["sandboxes"] != ["sb-b"]:
            assert time.monotonic() < deadline, f"still registered: {status}"
            time.sleep(0.1)
        assert status is not None
    finally:
        vmm.kill()
        vmm.wait()


def test_watch_refuses_a_bad_pid(gateway_home: Path, tmp_path: Path) -> None:  # noqa: F811
    launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
    for pid in (0, -1, "1", True):
        with pytest.raises(AgentkernelError, match="watch needs sandbox and a pid"):
            launcher.request({"op": "watch", "sandbox": "sb-a", "pid": pid})
    with pytest.raises(AgentkernelError, match="not registered"):
        launcher.request({"op": "watch", "sandbox": "sb-x", "pid": 1})


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process `pid` is gone and reaped (no zombie left in /proc)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_gateway_that_exits_is_reaped(gateway_home: Path, tmp_path: Path) -> None:  # noqa: F811
    a = rundir(tmp_path, "a")
    launcher.start("sb-a", DEFAULT, a)
    status = launcher.status()
    assert status is not None
    launcher.stop("sb-a", a)  # the last one: the process exits
    assert gone(status["pid"])


def test_a_gateway_that_does_not_start_in_time_is_killed_and_reaped(
    gateway_home: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher, "START_TIMEOUT", 0.0)
    with pytest.raises(AgentkernelError, match="did not start"):
        launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
    assert gone(int(launcher.pid_path().read_text()))


def test_the_gateway_raises_its_open_file_limit(gateway_home: Path, tmp_path: Path) -> None:  # noqa: F811
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 1024
    if hard == resource.RLIM_INFINITY or hard <= low:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # the gateway inherits it
    try:
        launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    status = launcher.status()
    assert status is not None
    limits = Path(f"/proc/{status['pid']}/limits").read_text().splitlines()
    line = next(x for x in limits if x.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)]
