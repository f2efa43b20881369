"""A sandbox's port relay: a detached process that listens on host addresses and carries each TCP
connection it accepts to a port of the guest's loopback (the agent's CONNECT), for as long as the
sandbox's VMM runs (see `ports`).

    python -m agentkernel.service.port_relay --sandbox NAME --rundir DIR --vmm-pid PID \\
        --backend-module MODULE

It takes `ports.lock` in the run directory for its life (a second relay exits at once with status
0) and answers one JSON request per line on `ports.sock` there: {"op": "forward", "guest_port",
"host", "host_port"} and {"op": "list"}. It holds one agent connection while TCP connections are
open (and LINGER seconds after), so it takes one of the sandbox's agent ports only while in use.
Every byte in flight is bounded: what the guest sends waits under the channel's window, what a
client sends is read only as fast as the guest takes it, and at most MAX_CONNECTIONS are carried at
once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import importlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from agentkernel import paths
from agentkernel.backends import registry
from agentkernel.errors import AgentkernelError, GuestPortError
from agentkernel.protocol.connection import Connection, TcpStream
from agentkernel.service import sandboxes
from agentkernel.service.ports import LOCK, SOCKET

log = logging.getLogger("agentkernel.port_relay")
CHUNK = 64 * 1024
LINGER = 5.0
"""Seconds the agent connection is kept open after the last TCP connection closed."""
ALIVE_INTERVAL = 0.5
"""Seconds between looks at whether the VMM still runs (a pidfd says so at once where it can)."""
CLOSE_WAIT = 10.0
"""Seconds the guest has to close a connection once both sides ended their data."""
MAX_CONNECTIONS = 128
"""TCP connections carried at once per sandbox; one more is closed at once. Each holds up to a
channel's window and a read buffer (~320 KiB), so this bounds the relay's memory (~40 MiB)."""


class Relay:
    def __init__(self, sandbox: str, rundir: Path) -> None:
        self.sandbox = sandbox
        self.rundir = rundir
        self.forwards: dict[tuple[str, int], tuple[int, asyncio.Server]] = {}
        self._session: contextlib.AsyncExitStack | None = None
        self._conn: Connection | None = None
        self._opening = asyncio.Lock()
        self._streams = 0
        self._linger: asyncio.TimerHandle | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- the agent connection, shared by every stream ----------------------------------------------

    async def _agent(self) -> Connection:
        async with self._opening:
            if self._conn is None or self._conn.broken:
                await self._drop_agent()
                session = contextlib.AsyncExitStack()
                self._conn = await session.enter_async_context(sandboxes.session(self.sandbox))
                self._session = session
            return self._conn

    async def _drop_agent(self) -> None:
        session, self._session, self._conn = self._session, None, None
        if session is not None:
            with contextlib.suppress(AgentkernelError):
                await session.aclose()

    def _idle(self) -> None:
        self._linger = None
        self._closing = asyncio.ensure_future(self._close_if_idle())

    async def _close_if_idle(self) -> None:
        async with self._opening:  # not while a stream is opening it
            if self._streams == 0:
                await self._drop_agent()

    # -- control requests --------------------------------------------------------------------------

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            try:
                request = json.loads(await reader.readline())
                answer = await self._handle(request)
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"error": f"bad request: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            with contextlib.suppress(OSError):
                await writer.drain()

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "list":
            return {"ports": [self._shown(key) for key in sorted(self.forwards)]}
        if request["op"] != "forward":
            return {"error": f"unknown request {request['op']!r}"}
        guest_port, host, wanted = int(request["guest_port"]), str(request["host"]), request["host_port"]
        for key, (port, _server) in self.forwards.items():
            if port == guest_port and key[0] == host and wanted in (None, 0, key[1]):
                return self._shown(key)  # forwarded already: the same address again
        if wanted and (host, wanted) in self.forwards:
            return {"error": f"{host} port {wanted} already forwards guest port "
                    f"{self.forwards[host, wanted][0]}", "field": "host_port"}  # fmt: skip
        try:
            server = await asyncio.start_server(
                lambda r, w: self.serve(r, w, guest_port), host, wanted or 0, reuse_address=True
            )
        except OSError as exc:
            field = "host" if exc.errno == errno.EADDRNOTAVAIL else "host_port"
            what = "not an address of this host" if field == "host" else exc.strerror or str(exc)
            return {"error": f"cannot listen on {host} port {wanted or 0}: {what}", "field": field}
        bound = server.sockets[0].getsockname()[1]
        self.forwards[host, bound] = (guest_port, server)
        log.info("forwarding %s port %d to guest port %d", host, bound, guest_port)
        return self._shown((host, bound))

    def _shown(self, key: tuple[str, int]) -> dict[str, Any]:
        return {"guest_port": self.forwards[key][0], "host": key[0], "port": key[1]}

    # -- one TCP connection ------------------------------------------------------------------------

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest_port: int
    ) -> None:
        peer = writer.get_extra_info("peername")
        if self._streams >= MAX_CONNECTIONS:
            log.warning(
                "connection from %s to guest port %d closed: %d connections open already",
                peer, guest_port, MAX_CONNECTIONS,
            )  # fmt: skip
            _reset(writer)
            return
        self._streams += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        stream: TcpStream | None = None
        try:
            stream = await (await self._agent()).open_tcp(guest_port)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_upstream(reader, stream))
                tasks.create_task(_downstream(stream, writer))
            async with asyncio.timeout(CLOSE_WAIT):
                await stream.wait_closed()
            writer.close()
        except* (AgentkernelError, OSError, TimeoutError) as group:
            exc = group.exceptions[0]
            what = (
                "nothing listens there"
                if isinstance(exc, GuestPortError) and exc.errno == errno.ECONNREFUSED
                else exc
            )
            log.warning("connection from %s to guest port %d: %s", peer, guest_port, what)
            _reset(writer)
        finally:
            if stream is not None:
                stream.close()
            self._streams -= 1
            if self._streams == 0:
                self._linger = asyncio.get_running_loop().call_later(LINGER, self._idle)


async def _upstream(reader: asyncio.StreamReader, stream: TcpStream) -> None:
    """Client to guest: read only as fast as the guest's window lets the bytes go on."""
    while data := await reader.read(CHUNK):
        await stream.write(data)
    await stream.close_write()


async def _downstream(stream: TcpStream, writer: asyncio.StreamWriter) -> None:
    """Guest to client: the channel's window is returned as frames are taken, and the next one is
    taken only once the client has drained the last (the transport's buffer is bounded)."""
    while data := await stream.read():
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the client's connection with a reset, so it sees a failure and not an empty answer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    writer.transport.abort()


async def _watch_vmm(alive: Any) -> None:
    """Return once the VMM is gone (a pidfd where there is one, else polling `alive()`)."""
    while alive():
        await asyncio.sleep(ALIVE_INTERVAL)


async def run(sandbox: str, rundir: Path, vmm_pid: int) -> int:
    record = sandboxes.get(sandbox)
    spec = sandboxes.spec_of(record)
    backend = registry.get_backend(record.backend)

    def alive() -> bool:
        return rundir.is_dir() and backend.is_alive(spec, vmm_pid)

    if not alive():
        log.error("the sandbox's VMM (pid %d) is not running", vmm_pid)
        return 1
    relay = Relay(sandbox, rundir)
    sock = rundir / SOCKET
    sock.unlink(missing_ok=True)  # a dead relay's: this one holds the lock
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(relay.control, path=str(sock))
    finally:
        os.umask(old)
    os.chmod(sock, 0o600)
    log.info("relay for sandbox %s ready (VMM pid %d)", sandbox, vmm_pid)
    gone = asyncio.Event()
    try:
        pidfd = os.pidfd_open(vmm_pid)
    except OSError:
        pidfd = -1
    if pidfd >= 0:
        asyncio.get_running_loop().add_reader(pidfd, gone.set)
    watcher = asyncio.ensure_future(_watch_vmm(alive))
    watcher.add_done_callback(lambda _t: gone.set())
    await gone.wait()
    log.info("the sandbox's VMM has ended: relay exits")
    server.close()
    sock.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentkernel.service.port_relay")
    parser.add_argument("--sandbox", required=True)
    parser.add_argument("--rundir", required=True, type=Path)
    parser.add_argument("--vmm-pid", required=True, type=int)
    parser.add_argument("--backend-module", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s port relay: %(message)s")
    lock = paths.open_private(args.rundir / LOCK, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another relay serves this sandbox
    info = getattr(importlib.import_module(args.backend_module), "INFO", None)
    if isinstance(info, registry.BackendInfo) and not registry.is_registered(info.name):
        registry.register(info)  # a backend from outside the package (the tests' fake)
    try:
        return asyncio.run(run(args.sandbox, args.rundir, args.vmm_pid))
    except AgentkernelError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
