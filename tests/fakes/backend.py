"""A fake backend: sandboxes whose guest is tests/fakes/guest.py, served by the test process itself.

Each started sandbox has a stand-in VMM, a `sleep` process whose command line names the sandbox's run
directory (as QEMU's names its pid file there), so the service's /proc-based code (liveness, `kill`
by tag, `reconcile`, the reaper) runs unchanged; killing that process is the VM dying. The agent
listens on `agent.sock` in the run directory, one connection per client (like the container
transport). The disk is a directory tree (`rootfs/` in the sandbox's work directory) seeded at
`prepare`, or copied from a snapshot; a snapshot copies it. There is no network and no shared
directory: the gateway is never started, and a mount is refused by the guest. A pause stops the
stand-in VMM (SIGSTOP), so a paused sandbox shows as a stopped process, and a resume continues it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from agentkernel import paths, procs
from agentkernel.backends import registry
from agentkernel.backends.base import VMSpec, kill_tagged
from agentkernel.backends.registry import BackendInfo, BackendStatus
from agentkernel.errors import AgentConnectionError, AgentkernelError
from agentkernel.protocol.connection import Connection
from tests.fakes import guest

NAME = "fake"
DISK = "rootfs"
SOCKET = "agent.sock"


def root_of(spec: VMSpec) -> Path:
    """The sandbox's disk: the guest's whole file tree."""
    return spec.workdir / DISK


class FakeBackend:
    name = NAME
    agent_ports = 4
    snapshot_disk = DISK
    snapshot_disk_format = "dir"

    def prepare(self, spec: VMSpec) -> None:
        paths.private_dir(spec.workdir)
        if spec.image.is_dir():  # a snapshot's disk
            shutil.copytree(spec.image, root_of(spec), symlinks=True)
        else:
            guest.seed(root_of(spec))

    def start(self, spec: VMSpec) -> int:
        paths.private_dir(spec.rundir)
        paths.open_private(spec.console_log, "ab").close()
        # bash's `exec -a` makes the run directory the process's argv[0]: the tag `kill` finds it by.
        # It ends by itself within the hour should the test process be killed before it could end it.
        vmm = subprocess.Popen(
            ["bash", "-c", 'exec -a "$0" sleep 3600', str(spec.rundir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        vm = guest.FakeVM(spec.name, root_of(spec), spec.console_log, vmm, read_only=spec.read_only)
        deadline = time.monotonic() + 5
        # Until the exec is done: bash names the run directory too, and while it execs `sleep` its
        # command line is briefly empty (which `is_alive` would take for the VMM's end).
        while procs.argv(vmm.pid)[:1] != [os.fsencode(spec.rundir)]:
            if vmm.poll() is not None or time.monotonic() > deadline:
                raise AgentkernelError("the fake VMM did not start")
            time.sleep(0.001)
        guest.host().boot(vm, spec.rundir / SOCKET)
        return vmm.pid

    async def connect(self, spec: VMSpec, pid: int, *, port: int, timeout: float) -> Connection:
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive(spec, pid):
                raise AgentkernelError("the VM is not running: the fake VMM has ended")
            conn = None
            try:
                conn = await Connection.open_unix(
                    spec.rundir / SOCKET, timeout=max(0.1, deadline - time.monotonic())
                )
                await conn.hello(
                    hostname=spec.name,
                    max_procs=spec.max_procs,
                    memory_mb=spec.memory_mb,
                    timeout=max(0.1, deadline - time.monotonic()),
                )
                return conn
            except AgentConnectionError:
                if conn is not None:
                    await conn.close()
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.01)

    def is_alive(self, spec: VMSpec, pid: int) -> bool:
        return procs.running(pid) and procs.names(pid, spec.rundir)

    def kill(self, spec: VMSpec, pid: int | None) -> None:
        kill_tagged(str(spec.rundir))

    def cleanup(self, spec: VMSpec, *, keep_disk: bool) -> None:
        shutil.rmtree(spec.rundir, ignore_errors=True)
        if not keep_disk:
            shutil.rmtree(spec.workdir, ignore_errors=True)

    async def snapshot(self, spec: VMSpec, pid: int, dest: Path) -> None:
        if spec.mounts:
            raise AgentkernelError("a sandbox with a shared directory cannot be snapshotted")
        await asyncio.to_thread(shutil.copytree, root_of(spec), dest / DISK, symlinks=True)

    async def pause(self, spec: VMSpec, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)

    async def unpause(self, spec: VMSpec, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    async def resume(self, spec: VMSpec, pid: int) -> None:
        if spec.restore is None or not (spec.restore / DISK).is_dir():
            raise AgentkernelError(f"no fake snapshot to resume at {spec.restore}")


INFO = BackendInfo(
    name=NAME,
    rank=-1,  # preferred over every real backend: where it is registered, it is what runs
    isolation="vm",
    capabilities=frozenset({"snapshot", "pause", "network", "read_only_root"}),
    probe=lambda: BackendStatus(True, "a fake guest served by this process (tests only)"),
    factory=lambda _profile: FakeBackend(),
)


def register() -> None:
    registry.register(INFO)


def unregister() -> None:
    registry.unregister(NAME)
