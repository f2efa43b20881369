"""Ports: a server that listens in a sandbox reached from the host, through every face (the CLI,
the HTTP API, the SDK sync and async, MCP) on the fake backend. The fake guest's loopback is the
host's, so the "guest's server" is a real TCP server the test runs on 127.0.0.1; the relay is the
real detached process, reaching the fake agent over its real socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client as McpClient

from agentkernel import procs
from agentkernel.cli.app import main as cli_main
from agentkernel.cli.port_cmds import parse_publish
from agentkernel.client import ApiError, AsyncClient, Client
from agentkernel.errors import (
    GuestPortError,
    InvalidRequestError,
    PortForwardError,
    PortsNotAllowedError,
    SandboxStateError,
)
from agentkernel.mcp_server.server import build_server
from agentkernel.protocol.frames import PORTS_VERSION
from agentkernel.service import port_relay, ports, sandboxes
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import SandboxService
from tests.api.server import free_port
from tests.conftest import wait_gone


class Server:
    """A TCP server on 127.0.0.1 (the fake guest's loopback): answers each connection with what it
    reads, upper-cased, once the client has half-closed; or, as told, floods or never reads."""

    def __init__(self, mode: str = "upper") -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if self.mode == "flood":
                block = b"f" * 65536
                while True:
                    conn.sendall(block)
            if self.mode == "deaf":
                time.sleep(60)
                return
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


def agentkernel(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line's entry point, in this process (where the fake backend is): exit status,
    stdout, stderr."""
    capsys.readouterr()
    argv, sys.argv = sys.argv, ["agentkernel", *args]
    try:
        cli_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def exchange(address: str, data: bytes, *, timeout: float = 20) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        return got


def make(tmp_path: Path, name: str, profile: str | None = None) -> None:
    async def main() -> None:
        async with SandboxService(tmp_path) as service:
            await service.create(
                await service.resolve(SandboxFlags(image="base", profile=profile)), name=name
            )

    asyncio.run(main())


def relay_pid(name: str) -> int | None:
    rundir = sandboxes.spec_of(sandboxes.get(name)).rundir
    found = [
        p for p in procs.naming(str(rundir)) if b"agentkernel.service.port_relay" in b" ".join(procs.argv(p))
    ]
    return found[0] if found else None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_connection_relays_both_ways_and_half_closes(tmp_path: Path, server: Server) -> None:
    make(tmp_path, "box")

    async def main() -> None:
        async with SandboxService(tmp_path) as service:
            conn = await service.connection("box")
            assert conn.agent_version >= PORTS_VERSION
            stream = await conn.open_tcp(server.port)
            await stream.write(b"hello " * 100_000)  # beyond one window: waits for the guest's grants
            await stream.close_write()
            got = b""
            while chunk := await stream.read():
                got += chunk
            await stream.wait_closed()
            assert got == b"HELLO " * 100_000
            with pytest.raises(GuestPortError) as refused:  # nothing listens there
                await conn.open_tcp(free_port())
            assert refused.value.status == 502 and "refused" in str(refused.value)
            assert not conn.broken  # one failed connection, not a broken agent connection

    asyncio.run(asyncio.wait_for(main(), 60))


def test_cli_port_forwards_lists_and_reuses(
    tmp_path: Path, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path, "box")
    code, out, err = agentkernel(capsys, "port", "box", str(server.port))
    assert code == 0, err
    address = out.strip()
    assert address.startswith("127.0.0.1:")
    assert exchange(address, b"over the cli") == b"OVER THE CLI"
    _, out, _ = agentkernel(capsys, "port", "box", str(server.port), "--json")
    assert json.loads(out) == {
        "guest_port": server.port,
        "host": "127.0.0.1",
        "port": int(address.rsplit(":", 1)[1]),
    }
    assert agentkernel(capsys, "port", "box") == (0, f"{server.port} -> {address}\n", "")
    assert agentkernel(capsys, "port", "box", "70000") == (
        1,
        "",
        "agentkernel: error: port: must be a port number from 1 to 65535 (got 70000)\n",
    )
    code, _, err = agentkernel(capsys, "port", "box", str(server.port), "--bind", "0.0.0.0")
    assert code == 1 and "loopback only" in err and len(err.splitlines()) == 1  # moderate: loopback only


def test_nothing_listening_fails_each_connection_and_the_listener_stays(tmp_path: Path) -> None:
    make(tmp_path, "box")
    guest_port = free_port()

    async def expose() -> str:
        async with SandboxService(tmp_path) as service:
            return (await service.expose_port("box", guest_port)).address

    address = asyncio.run(expose())
    host, _, port = address.rpartition(":")
    for _ in range(2):  # each connection fails on its own: a reset, not an empty answer
        with (
            socket.create_connection((host, int(port)), timeout=10) as conn,
            pytest.raises(ConnectionResetError),
        ):
            conn.sendall(b"x")
            conn.recv(10)
    log = (sandboxes.spec_of(sandboxes.get("box")).rundir / ports.LOG).read_text()
    assert f"to guest port {guest_port}: nothing listens there" in log
    late = Server()  # a server that starts later is reached through the same listener
    late.sock.close()
    late.sock = socket.create_server(("127.0.0.1", guest_port))
    threading.Thread(target=late._serve, daemon=True).start()
    try:
        assert exchange(address, b"late") == b"LATE"
    finally:
        late.close()


def test_policy_refuses_with_one_line(
    tmp_path: Path, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path, "tight", profile="restrictive")
    assert agentkernel(capsys, "port", "tight", str(server.port)) == (
        1,
        "",
        "agentkernel: error: sandbox 'tight' runs under the restrictive profile, which forwards no "
        'ports (security.ports = "off")\n',
    )
    assert relay_pid("tight") is None  # refused before anything was started
    Path("agentkernel.toml").write_text('[security]\nports = "any"\n')
    make(tmp_path, "wide")
    assert sandboxes.get("wide").effective_policy.ports == "any"

    async def main() -> str:
        async with SandboxService(tmp_path) as service:
            with pytest.raises(PortsNotAllowedError):
                await service.expose_port("tight", server.port)
            with pytest.raises(InvalidRequestError) as bad:
                await service.expose_port("wide", server.port, host="example.org")
            assert bad.value.field == "host"
            return (await service.expose_port("wide", server.port, host="0.0.0.0")).address

    address = asyncio.run(main())
    assert address.startswith("0.0.0.0:")
    assert exchange(f"127.0.0.1:{address.rsplit(':', 1)[1]}", b"any") == b"ANY"


def test_api_sdk_and_openapi(api: str, server: Server) -> None:
    with Client(api) as ak:
        box = ak.create_sandbox("box", image="base")
        address = box.get_host(server.port)
        assert address.startswith("127.0.0.1:")
        assert exchange(address, b"sync sdk") == b"SYNC SDK"
        assert box.get_host(server.port) == address  # the same forward again
        tight = ak.create_sandbox("tight", image="base", profile="restrictive")
        with pytest.raises(ApiError) as refused:
            tight.get_host(server.port)
        assert (refused.value.status, refused.value.code) == (403, "ports_not_allowed")
    answer = httpx.post(f"{api}/sandboxes/box/ports", json={"port": server.port}).json()
    assert answer == {
        "guest_port": server.port,
        "host": "127.0.0.1",
        "port": int(address.rsplit(":", 1)[1]),
        "bind": "127.0.0.1",
        "url": f"http://{address}",
    }
    assert httpx.get(f"{api}/sandboxes/box/ports").json() == [answer]
    bad = httpx.post(f"{api}/sandboxes/box/ports", json={"port": 0})
    assert (bad.status_code, bad.json()["code"], bad.json()["field"]) == (422, "invalid_field", "port")
    taken = httpx.post(f"{api}/sandboxes/box/ports", json={"port": 1, "host_port": answer["port"]})
    assert (taken.status_code, taken.json()["code"]) == (409, "port_forward_failed")
    assert "already forwards guest port" in taken.json()["detail"]
    spec = httpx.get(f"{api}/openapi.json").json()
    route = spec["paths"]["/sandboxes/{name}/ports"]
    assert {"post", "get"} <= route.keys() and "403" in route["post"]["responses"]

    async def main() -> None:
        async with AsyncClient(api) as ak:
            box = await ak.sandbox("box")
            assert await box.get_host(server.port) == address
            other = await box.get_host(server.port, host_port=free_port())
            assert other != address
            assert exchange(other, b"async sdk") == b"ASYNC SDK"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_mcp_expose_port(tmp_path: Path, server: Server) -> None:
    async def main() -> None:
        async with McpClient(build_server(tmp_path)) as client:

            async def call(tool: str, **arguments: Any) -> Any:
                return await client.call_tool(tool, arguments)

            assert not (await call("create_sandbox", name="box", image="base")).is_error
            result = await call("expose_port", name="box", port=server.port)
            assert not result.is_error, result.content
            exposed = result.structured_content
            assert (
                isinstance(exposed, dict) and exposed["url"] == f"http://{exposed['host']}:{exposed['port']}"
            )
            got = await asyncio.to_thread(exchange, f"{exposed['host']}:{exposed['port']}", b"mcp")
            assert got == b"MCP"
            assert not (
                await call("create_sandbox", name="tight", image="base", profile="restrictive")
            ).is_error
            refused = await call("expose_port", name="tight", port=server.port)
            assert refused.is_error and "forwards no ports" in str(refused.content)

    asyncio.run(asyncio.wait_for(main(), 90))


def test_run_publish_forwards_while_the_command_runs(
    tmp_path: Path, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_publish("80") == (None, None, 80)
    assert parse_publish("8080:80") == (None, 8080, 80)
    assert parse_publish("0.0.0.0:8080:80") == ("0.0.0.0", 8080, 80)
    assert parse_publish("127.0.0.1::80") == ("127.0.0.1", None, 80)
    assert parse_publish("[::1]:8080:80") == ("::1", 8080, 80)
    for bad in ("", "a:80", "1:2:3:4", "[::1:80"):
        with pytest.raises(InvalidRequestError):
            parse_publish(bad)
    code, _, err = agentkernel(capsys, "run", "-p", "x:1", "--", "true")
    assert code == 1 and err.startswith("agentkernel: error: --publish: 'x:1': use [HOST_IP:]")
    host_port = free_port()
    answers: list[bytes] = []

    def client() -> None:  # while the command runs, once the sandbox is up and the port forwarded
        deadline = time.monotonic() + 60
        while not answers and time.monotonic() < deadline:
            with contextlib.suppress(ConnectionRefusedError, ConnectionResetError):
                answers.append(exchange(f"127.0.0.1:{host_port}", b"run -p"))
            time.sleep(0.05)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        code, _, err = agentkernel(capsys, "run", "-p", f"{host_port}:{server.port}", "--", "sleep", "3")
    finally:
        thread.join(60)
    assert (code, answers) == (0, [b"RUN -P"]), err
    with pytest.raises(ConnectionRefusedError):  # the sandbox is gone, and the relay with it
        exchange(f"127.0.0.1:{host_port}", b"late", timeout=5)


def test_relay_ends_with_its_sandbox(tmp_path: Path, server: Server) -> None:
    make(tmp_path, "a")
    make(tmp_path, "b")

    async def expose(name: str) -> str:
        async with SandboxService(tmp_path) as service:
            return (await service.expose_port(name, server.port)).address

    asyncio.run(expose("a"))
    stopped = relay_pid("a")
    assert stopped is not None
    asyncio.run(_stop(tmp_path, "a"))
    assert wait_gone(stopped), "the relay outlived its stopped sandbox"

    address = asyncio.run(expose("b"))
    killed = relay_pid("b")
    assert killed is not None
    vmm = sandboxes.get("b").pid
    assert vmm is not None
    os.kill(vmm, signal.SIGKILL)  # the VMM dies under everyone's feet
    assert wait_gone(killed), "the relay outlived its VMM"
    with pytest.raises(ConnectionRefusedError):
        exchange(address, b"gone", timeout=5)


async def _stop(tmp_path: Path, name: str) -> None:
    async with SandboxService(tmp_path) as service:
        await service.stop(name)


def test_relay_socket_is_this_users_only(tmp_path: Path, server: Server) -> None:
    make(tmp_path, "box")

    async def expose() -> None:
        async with SandboxService(tmp_path) as service:
            await service.expose_port("box", server.port)

    asyncio.run(expose())
    rundir = sandboxes.spec_of(sandboxes.get("box")).rundir
    sock = rundir / ports.SOCKET
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("trying the socket as another user needs root and /usr/bin/python3")
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
    )

    def as_nobody() -> int:
        return subprocess.run(
            ["/usr/bin/python3", "-c", probe, str(sock)], user=65534, group=65534, extra_groups=[], timeout=30
        ).returncode

    # Only the sandbox's own modes stand in the way: every directory above the run directory lets
    # anyone through for the test's length.
    opened = [d for d in rundir.parents if not d.stat().st_mode & stat.S_IXOTH]
    for d in opened:
        d.chmod(d.stat().st_mode | stat.S_IXOTH)
    try:
        assert as_nobody() == 3  # the run directory (0700) keeps another user out
        rundir.chmod(0o711)
        assert as_nobody() == 3  # and so does the socket's own mode (0600)
    finally:
        rundir.chmod(0o700)
        for d in opened:
            d.chmod(d.stat().st_mode & ~stat.S_IXOTH)


@pytest.mark.parametrize("mode", ["flood", "deaf"])
def test_a_flooding_or_deaf_guest_server_cannot_grow_the_relay(tmp_path: Path, mode: str) -> None:
    """flood: the guest's server writes without end to a client that never reads; deaf: the client
    writes without end to a guest's server that never reads. Either way the bytes wait under the
    windows, and the relay's memory stays put."""
    make(tmp_path, "box")
    guest = Server(mode)
    try:

        async def expose() -> str:
            async with SandboxService(tmp_path) as service:
                return (await service.expose_port("box", guest.port)).address

        address = asyncio.run(expose())
        host, _, port = address.rpartition(":")
        relay = relay_pid("box")
        assert relay is not None
        before = rss_kib(relay)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            if mode == "flood":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                time.sleep(4)  # it floods meanwhile; nobody reads
            else:
                conn.settimeout(4)
                sent = 0
                with contextlib.suppress(TimeoutError):
                    while sent < 512 << 20:
                        sent += conn.send(b"d" * 65536)
                assert sent < 64 << 20, f"{sent} bytes went into a guest server that reads nothing"
            after = rss_kib(relay)
        assert after - before < 32 * 1024, f"the relay grew from {before} to {after} KiB"
    finally:
        guest.close()


def test_an_agent_without_ports_is_told_to_recreate(tmp_path: Path) -> None:
    make(tmp_path, "box")

    async def main() -> None:
        async with SandboxService(tmp_path) as service:
            conn = await service.connection("box")
            conn.agent_version = PORTS_VERSION - 1  # as a sandbox made from an older image
            with pytest.raises(SandboxStateError, match="recreate the sandbox"):
                await conn.open_tcp(80)
            with pytest.raises(SandboxStateError, match="recreate the sandbox"):
                await service.expose_port("box", 80)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    """A client opening connections without end gets MAX_CONNECTIONS carried; the next is reset (and
    logged), and a place freed is taken again."""
    make(tmp_path, "box")
    guest = Server("deaf")
    held: list[socket.socket] = []
    try:

        async def expose() -> str:
            async with SandboxService(tmp_path) as service:
                return (await service.expose_port("box", guest.port)).address

        host, _, port = asyncio.run(expose()).rpartition(":")
        for _ in range(port_relay.MAX_CONNECTIONS):
            held.append(socket.create_connection((host, int(port)), timeout=30))
        deadline = time.monotonic() + 60
        while guest.accepted < port_relay.MAX_CONNECTIONS:
            assert time.monotonic() < deadline, f"only {guest.accepted} connections reached the guest"
            time.sleep(0.05)
        with (
            socket.create_connection((host, int(port)), timeout=30) as extra,
            contextlib.suppress(ConnectionResetError),
        ):
            assert extra.recv(10) == b""  # closed at once: an end or a reset, never carried on
        log = sandboxes.spec_of(sandboxes.get("box")).rundir / ports.LOG
        deadline = time.monotonic() + 10  # the relay may log just after it reset the connection
        while f"{port_relay.MAX_CONNECTIONS} connections open already" not in log.read_text():
            assert time.monotonic() < deadline, "the refused connection was not logged"
            time.sleep(0.05)
        assert guest.accepted == port_relay.MAX_CONNECTIONS
        freed = held.pop()  # reset: the guest's server holds a half-closed one open
        freed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        freed.close()
        deadline = time.monotonic() + 30
        while guest.accepted <= port_relay.MAX_CONNECTIONS:
            with contextlib.suppress(ConnectionResetError):
                conn = socket.create_connection((host, int(port)), timeout=30)
                held.append(conn)
                time.sleep(0.2)
            assert time.monotonic() < deadline, "a freed place was not taken again"
            time.sleep(0.05)
    finally:
        for conn in held:
            conn.close()
        guest.close()


def test_a_relay_that_does_not_answer_in_time_is_killed(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(tmp_path, "box")
    monkeypatch.setattr(ports, "START_TIMEOUT", 0.0)  # no relay answers that soon

    async def expose() -> None:
        async with SandboxService(tmp_path) as service:
            await service.expose_port("box", server.port)

    with pytest.raises(PortForwardError, match="did not start"):
        asyncio.run(expose())
    assert relay_pid("box") is None  # killed and reaped: neither running nor a zombie
