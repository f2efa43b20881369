"""The interface every backend implements, and the description of one sandbox's VM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agentkernel import procs
from agentkernel.config import DEFAULT_MAX_PROCS
from agentkernel.errors import AgentConnectionError, AgentkernelError
from agentkernel.network.policy import EgressRules
from agentkernel.protocol.connection import Connection

AGENT_PATH = "/sbin/agentkernel-agent"
"""The guest agent in every image: the VM's init, the container's PID 1."""
MAX_UNIX_PATH = 107
"""The longest path a Unix socket can be bound or connected at."""


@dataclass(frozen=True)
class Mount:
    """A host directory shared into the guest (virtio-9p under QEMU)."""

    host: Path
    guest: str
    read_only: bool

    @property
    def tag(self) -> str:
        return "home" if self.guest == "/mnt" else "workspace"


@dataclass(frozen=True)
class VMSpec:
    """Everything a backend needs to run one sandbox."""

    name: str
    kernel: Path
    image: Path  # the immutable root filesystem image
    workdir: Path  # per-sandbox files that live as long as the sandbox: disk overlay, logs
    rundir: Path  # sockets and pid file, on a short path (Unix socket paths are limited to 107 bytes)
    vcpus: int = 1
    memory_mb: int = 512
    image_format: str = "raw"  # a fork's is its backend's snapshot_disk_format (qcow2 under QEMU)
    restore: Path | None = None  # a snapshot directory to resume from instead of booting
    egress: EgressRules | None = None  # None: no network at all, the guest has only lo
    read_only: bool = False  # the root disk is read-only (host-enforced); /tmp is a tmpfs
    mounts: tuple[Mount, ...] = ()
    max_procs: int = DEFAULT_MAX_PROCS
    """Processes and threads the sandbox's commands may have at once (the guest's pids.max, a
    container's --pids-limit); a spec that does not say gets the default profile's, never none."""
    disk_mb: int | None = None
    """The writable root disk's size in MiB (None: the image's); read by `prepare` only, where a
    backend that cannot size a disk refuses it (backends/disksize)."""

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"


class Backend(Protocol):
    name: str
    agent_ports: int  # how many host clients can talk to one sandbox at once

    def prepare(self, spec: VMSpec) -> None:
        """Make the sandbox's own writable disk over the immutable image."""

    def start(self, spec: VMSpec) -> int:
        """Start the VM detached from the caller; return the VMM's pid once it runs."""

    async def connect(self, spec: VMSpec, pid: int, *, port: int, timeout: float) -> Connection:
        """Open an agent connection and complete the HELLO exchange."""

    def is_alive(self, spec: VMSpec, pid: int) -> bool:
        """Whether `pid` is still this sandbox's VMM (not a dead or reused pid)."""

    def kill(self, spec: VMSpec, pid: int | None) -> None:
        """Stop the VMM at once, and every helper process of the sandbox (a port relay, a watchdog),
        and withdraw it from the egress gateway. With pid None (a start that was interrupted before
        it recorded one) the VMM is found by what names this sandbox in its command line (see
        `tagged`)."""

    def cleanup(self, spec: VMSpec, *, keep_disk: bool) -> None:
        """Remove runtime files; with keep_disk False also the disk and logs."""


class SnapshotBackend(Backend, Protocol):
    """A backend that can save a running VM (memory, devices, disk) and resume copies of it."""

    snapshot_disk: str  # the disk's file name in a snapshot directory: a fork's image
    snapshot_disk_format: str  # that file's format (qcow2 over the image, or a raw copy)

    async def snapshot(self, spec: VMSpec, pid: int, dest: Path) -> None:
        """Save the running VM into the empty directory `dest`; the VM runs on afterwards."""

    async def resume(self, spec: VMSpec, pid: int) -> None:
        """Finish a start from `spec.restore`: load the saved state into the new VM and run it."""


class PausableBackend(Backend, Protocol):
    """A backend that can stop a running VM's vCPUs, keeping its memory and devices in the VMM, and
    let them run on: the guest's processes continue where they were."""

    async def pause(self, spec: VMSpec, pid: int) -> None:
        """Stop the VM's vCPUs; the VMM keeps running."""

    async def unpause(self, spec: VMSpec, pid: int) -> None:
        """Let a paused VM's vCPUs run again."""


KILL_WAIT = 5.0
"""Seconds `kill_tagged` and `kill_and_wait` keep at it before they give up on a process that will
not die."""


def runs_naming(pid: int, path: str | Path) -> bool:
    """Whether `pid` runs (not a zombie) and names `path` (or a path below it) in its arguments:
    a VMM is told from a reused pid by the run directory's files in its command line."""
    return procs.running(pid) and procs.names(pid, path)


def kill_and_wait(pid: int, alive: Callable[[], bool], *, timeout: float = KILL_WAIT) -> None:
    """SIGKILL `pid` if `alive()` says it is still the process meant (not a reused pid), then wait
    (up to `timeout`) until it is gone."""
    if not alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.01)


def tagged(*tags: str) -> list[int]:
    """Live processes (this one excepted) with one of `tags` as an argument, or a path under one in
    an argument.

    A sandbox's processes all name its run directory, which is unique per sandbox: QEMU its
    `-pidfile`, the forwarders QEMU spawns their sockets, a port relay and a lifetime watchdog the
    directory itself; Firecracker under its jailer has its instance id. So they are
    found whether or not their pid was ever recorded.
    """
    return procs.naming(*tags)


def kill_tagged(*tags: str) -> None:
    """SIGKILL every process `tagged` with `tags`, scanning again until none is left: a VMM that
    was still daemonizing when first seen forks a child that the next scan finds. Whatever a scan
    finds is killed even when the scan outlasted KILL_WAIT (on a loaded host one pass over /proc
    can), so only the scans after it are bounded."""
    deadline = time.monotonic() + KILL_WAIT
    while pids := tagged(*tags):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)


def vm_hello(spec: VMSpec) -> dict[str, Any]:
    """What a VM's agent is told in HELLO: its hostname, process and memory limits."""
    return {"hostname": spec.name, "max_procs": spec.max_procs, "memory_mb": spec.memory_mb}


def vm_greeting(spec: VMSpec) -> Callable[[Connection, float], Awaitable[None]]:
    """The HELLO a VM's agent gets (`vm_hello`, and the host's clock)."""

    async def greet(conn: Connection, remaining: float) -> None:
        await conn.hello(**vm_hello(spec), timeout=remaining)

    return greet


async def connect_agent(
    open_socket: Callable[[float], Awaitable[Connection | None]],
    greet: Callable[[Connection, float], Awaitable[object]],
    *,
    alive: Callable[[], bool],
    detail: Callable[[], str],
    what: str,
    timeout: float,
    interval: float,
) -> Connection:
    """An agent connection that has completed HELLO, retried while the sandbox boots.

    `open_socket(remaining)` opens a connection, or returns None while there is no socket to connect
    to yet; `greet(conn, remaining)` does the HELLO exchange. A connection whose HELLO failed is
    closed before the next try, whatever the failure. Fails at once, with `detail()` (the console's
    last lines), when `alive()` says the sandbox (`what`: "the VM", ...) has ended, and after
    `timeout` seconds with the last connection error.
    """
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(0.1, deadline - time.monotonic())

    last = "its agent socket does not exist yet"
    while True:
        if not alive():
            raise AgentkernelError(f"{what} is not running: {detail()}")
        try:
            conn = await open_socket(remaining())
            if conn is not None:
                try:
                    await greet(conn, remaining())
                except BaseException:
                    await conn.close()
                    raise
                return conn
        except AgentConnectionError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise AgentConnectionError(f"the agent did not answer within {timeout:g}s ({last}): {detail()}")
        await asyncio.sleep(interval)


TAIL_BYTES = 4096


def file_tail(path: Path) -> bytes:
    """The end of a log the guest or a VMM wrote (bounded: never the whole file); b"" if unreadable."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            return f.read(TAIL_BYTES)
    except OSError:
        return b""


def tail_line(text: str, lines: int = 5) -> str:
    """The last non-empty lines of `text`, joined on one line of at most 1000 characters."""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)[:1000]


PANIC = b"Kernel panic - not syncing: "


def exit_reason(console_log: Path) -> str:
    """Why a sandbox ended without a shutdown, as far as the end of its console log tells."""
    tail = file_tail(console_log)
    at = tail.rfind(PANIC)
    if at < 0:
        return "its VMM process ended without a shutdown (killed, or crashed)"
    line = tail[at + len(PANIC) :].split(b"\n", 1)[0].decode(errors="replace").strip()[:300]
    if line.startswith("Attempted to kill init!"):  # the agent is the guest's init
        return f"the guest agent (PID 1) died and the guest kernel panicked: {line}"
    return f"the guest kernel panicked: {line}"
