"""A running sandbox's lifetime changed while it runs, and pausing and resuming it.

The implementation behind `service.SandboxService`, private to this package. A lifetime ends at the
record's `deadline`, which `sandboxes.reconcile` enforces on every read, and which the sandbox's
watchdog (`sandboxes.arm_watchdog`) enforces whoever is watching: it reads the deadline from a
file in the run directory each time it wakes, so a deadline moved later is kept by the watchdog
already running, and one moved earlier gets a new watchdog of its own.

A paused sandbox keeps its memory and devices in its VMM, its vCPUs stopped, and its lifetime runs
on: a forgotten paused sandbox still ends. Only backends with the `pause` capability can pause.
"""

from __future__ import annotations

import time
from typing import Final, Literal, cast

import anyio

from agentkernel.backends import get_backend, registry
from agentkernel.backends.base import PausableBackend
from agentkernel.errors import SandboxNotRunningError, SandboxStateError
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import audit, sandboxes
from agentkernel.service.checks import check_lifetime

DEFAULT_LIFETIME = 3600.0
"""Seconds a sandbox made through the HTTP API or MCP runs when its maker gives no lifetime (the
server's `--default-lifetime` changes it; 0: none), so that one an agent forgets does not run on."""


def lifetime_for(asked: float | None, default: float | None) -> float | None:
    """The lifetime of a sandbox a server (the HTTP API, MCP) makes: what its client asked for (0:
    none), else the server's default (None: none)."""
    if asked is None:
        return default
    return check_lifetime(asked, field="timeout") if asked else None


AS_SAVED: Final = "as saved"
"""A fork's lifetime when none is given: the lifetime of the sandbox its snapshot was taken from."""
ForkLifetime = float | None | Literal["as saved"]


def fork_lifetime(asked: float | None, default: float | None) -> ForkLifetime:
    """A fork's lifetime on a server: as `lifetime_for`, but with nothing asked and no default it
    keeps its snapshot's."""
    return AS_SAVED if asked is None and default is None else lifetime_for(asked, default)


async def _current(name: str, lock: sandboxes.Flock) -> SandboxRecord:
    def read() -> SandboxRecord:
        with lock.held_here():
            return sandboxes.get(name)

    return await anyio.to_thread.run_sync(read)


async def set_timeout(name: str, seconds: float | None) -> SandboxRecord:
    """End running (or paused) sandbox `name` `seconds` from now, earlier or later than it would
    have; None: it runs until stopped. Its `lifetime_s`, the lifetime of each later start, stays."""
    async with sandboxes.locked_async(name) as lock:
        record = await _current(name, lock)
        if record.status not in ("running", "paused") or record.pid is None:
            raise SandboxNotRunningError(name, record.status)
        spec = sandboxes.spec_of(record)
        deadline = time.time() + seconds if seconds is not None else None
        earlier = deadline is not None and (record.deadline is None or deadline < record.deadline)

        def change() -> None:
            assert record.pid is not None
            if earlier:
                assert deadline is not None
                sandboxes.arm_watchdog(spec, record.pid, deadline)
            else:
                sandboxes.set_deadline(spec, deadline)
            state.update(name, deadline=deadline)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(change)
        record.deadline = deadline
    audit.record("set_timeout", name, seconds=seconds)
    return record


async def pause(name: str) -> SandboxRecord:
    """Stop a running sandbox's vCPUs, keeping its memory on the host; a paused one is left as it is."""
    async with sandboxes.locked_async(name) as lock:
        record = await _current(name, lock)
        if record.status == "paused":
            return record
        if record.status != "running" or record.pid is None:
            raise SandboxNotRunningError(name, record.status)
        await _pausable(record).pause(sandboxes.spec_of(record), record.pid)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: state.update(name, status="paused"))
        record.status = "paused"
    audit.record("pause", name)
    return record


async def resume(name: str) -> SandboxRecord:
    """Let a paused sandbox run on where it was; a running one is left as it is."""
    async with sandboxes.locked_async(name) as lock:
        record = await _current(name, lock)
        if record.status == "running":
            return record
        if record.status != "paused" or record.pid is None:
            raise SandboxStateError(f"sandbox '{name}' is not paused (status: {record.status})")
        await _pausable(record).unpause(sandboxes.spec_of(record), record.pid)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: state.update(name, status="running"))
        record.status = "running"
    audit.record("resume", name)
    return record


def _pausable(record: SandboxRecord) -> PausableBackend:
    if "pause" not in registry.info(record.backend).capabilities:
        raise SandboxStateError(f"the {record.backend} backend cannot pause a sandbox: stop it instead")
    return cast(PausableBackend, get_backend(record.backend))
