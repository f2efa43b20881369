"""Whether a sandbox's VMM still runs, told from /proc alone where its backend allows: for the thin
command line, which reads records without importing the backends."""

from __future__ import annotations

from pathlib import Path

from agentkernel import procs

QEMU_PIDFILE = "qemu.pid"
"""QEMU's `-pidfile` in the run directory: its command line names it, which tells it from a reused pid."""


def vmm_alive(backend: str, rundir: Path, pid: int) -> bool | None:
    """The backend's own `is_alive` answer, or None where only the backend can give it (Firecracker
    drains its console writer once it has ended, a container may need its engine)."""
    if backend == "qemu":
        return procs.running(pid) and procs.names(pid, rundir / QEMU_PIDFILE)
    return None
