"""Forwarding a sandbox's ports to the host: the service's side.

Each running sandbox with a forwarded port has one relay (`port_relay`), a detached process started
on first use and told what to forward over a Unix socket in the sandbox's run directory (0600, in a
0700 directory: only this user reaches it). The relay names the run directory in its command line,
so stopping or removing the sandbox kills it with the VMM's other helpers, and it exits by itself
once the VMM is gone: no forward outlives its sandbox. Forwards end with the sandbox's run: a
restarted sandbox has none until asked again.

A forward binds 127.0.0.1 unless another address is asked for, and the sandbox's policy decides
(`security.ports`): "off" forwards nothing, "loopback" only to the host's loopback, "any" also to
other addresses of the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from agentkernel import paths
from agentkernel.backends.base import VMSpec
from agentkernel.backends.registry import get_backend
from agentkernel.errors import (
    PortForwardError,
    PortsNotAllowedError,
    SandboxNotRunningError,
    SandboxStateError,
)
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import PORTS_VERSION
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import sandboxes
from agentkernel.service.checks import check_bind_address, check_port

SOCKET = "ports.sock"
LOG = "ports.log"
LOCK = "ports.lock"
START_TIMEOUT = 30.0
"""Seconds a new relay has to answer on its socket."""
REQUEST_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ForwardedPort:
    """Guest port `guest_port` is reached at `host`:`port` on the host (`host` is the address the
    relay listens on: 0.0.0.0 or :: mean every address of the host)."""

    guest_port: int
    host: str
    port: int

    @property
    def address(self) -> str:
        """`host:port`, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def record(self) -> dict[str, Any]:
        return {"guest_port": self.guest_port, "host": self.host, "port": self.port}


def is_wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def check_allowed(record: SandboxRecord, host: str) -> None:
    """PortsNotAllowedError unless the sandbox's policy lets a port be forwarded to `host`."""
    policy = record.effective_policy
    if policy.ports == "off":
        raise PortsNotAllowedError(
            f"sandbox '{record.name}' runs under the {policy.profile} profile, which forwards no ports "
            '(security.ports = "off")'
        )
    if policy.ports != "any" and not ipaddress.ip_address(host).is_loopback:
        raise PortsNotAllowedError(
            f"sandbox '{record.name}' forwards ports to the host's loopback only: listening on {host} "
            'needs security.ports = "any" (the permissive profile has it)',
            field="host",
        )


async def expose(
    name: str,
    port: int,
    *,
    host: str | None,
    host_port: int | None,
    connection: Callable[[], Awaitable[Connection]],
) -> ForwardedPort:
    """Forward guest port `port` of running sandbox `name` to `host` (default 127.0.0.1) port
    `host_port` (default: the one already forwarded for it, else a free one). `connection` gives
    the sandbox's agent connection (once the request is allowed): its agent must know CONNECT."""
    port = check_port(port)
    bind = check_bind_address(host) if host is not None else LOOPBACK
    wanted = check_port(host_port, field="host_port", ephemeral=True) if host_port is not None else None
    record = await anyio.to_thread.run_sync(sandboxes.get, name)
    if record.status != "running" or record.pid is None:
        raise SandboxNotRunningError(name, record.status)
    check_allowed(record, bind)
    agent_version = (await connection()).agent_version
    if agent_version < PORTS_VERSION:
        raise SandboxStateError(
            f"sandbox '{name}' has an agent of protocol {agent_version}, which cannot reach its ports: "
            "recreate the sandbox from a current image"
        )
    spec = sandboxes.spec_of(record)
    await anyio.to_thread.run_sync(ensure_relay, record, spec)
    answer = await _ask(spec.rundir, {"op": "forward", "guest_port": port, "host": bind, "host_port": wanted})
    return ForwardedPort(answer["guest_port"], answer["host"], answer["port"])


async def forwarded(name: str) -> list[ForwardedPort]:
    """The ports forwarded from sandbox `name` now (none when no relay runs)."""
    record = await anyio.to_thread.run_sync(sandboxes.get, name)
    spec = sandboxes.spec_of(record)
    if record.status != "running" or not (spec.rundir / SOCKET).exists():
        return []
    try:
        answer = await _ask(spec.rundir, {"op": "list"})
    except PortForwardError:
        return []  # the relay is gone (its sandbox stopping): nothing is forwarded
    return [ForwardedPort(f["guest_port"], f["host"], f["port"]) for f in answer["ports"]]


async def _ask(rundir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the sandbox's relay; its answer, or its error raised as PortForwardError."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(rundir / SOCKET))
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        raise PortForwardError(f"the sandbox's port forwarder did not answer: {exc}") from None
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise PortForwardError(f"the sandbox's port forwarder ended (see {rundir / LOG})") from None
    if "error" in answer:
        raise PortForwardError(str(answer["error"]), field=str(answer.get("field") or "port"))
    return answer


def _answers(sock: Path) -> bool:
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def ensure_relay(record: SandboxRecord, spec: VMSpec) -> None:
    """Start the sandbox's relay unless one answers; wait until it does. Concurrent callers start at
    most one (the relay holds LOCK for its life; a second one exits at once)."""
    sock = spec.rundir / SOCKET
    if _answers(sock):
        return
    assert record.pid is not None
    backend = get_backend(record.backend)
    with paths.open_private(spec.rundir / LOG, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "agentkernel.service.port_relay",
                "--sandbox", record.name, "--rundir", str(spec.rundir), "--vmm-pid", str(record.pid),
                "--backend-module", type(backend).__module__,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            # the parent's import path: a backend registered from any module is found there too
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(sock):
        # A relay that exits 0 at once found another one running (which answers soon).
        if proc.poll() or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise PortForwardError(f"the sandbox's port forwarder did not start: see {spec.rundir / LOG}")
        time.sleep(0.02)
    if proc.returncode is None:  # it runs on: reaped when it exits (this process may live long)
        threading.Thread(target=proc.wait, name=f"reap port relay {proc.pid}", daemon=True).start()
