"""Owner records: which process a sandbox exists for, so that nothing a client started outlives it.

A sandbox made for one caller (`run`, `agent run`, `POST /run`, MCP `run_command`, and what the pool
daemon is making or keeps ready) carries its owner in its record (`SandboxRecord.owner`): the process's pid
and its start time (field 22 of /proc/PID/stat, clock ticks after boot). A pid can be reused by a new
process; the pair cannot, so a mark names one process for good. `sandboxes.reap` removes a sandbox
whose owner has died. Persistent sandboxes (`create`, `start`, `run --keep`) have no owner and are
never reaped.

The pool daemon's ready sandboxes are the exception that waits: a restarted daemon adopts them (and
becomes their owner), so the reaper first marks them orphaned and removes them only when no daemon
took them within `ADOPT_GRACE` seconds.
"""

from __future__ import annotations

import os

from agentkernel.procs import start_time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time: the thin CLI)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TypeAlias

    Owner: TypeAlias = dict[str, Any]

ADOPT_GRACE = 20.0
"""Seconds a dead pool daemon's sandboxes wait for a new daemon to adopt them."""
REAP_INTERVAL = 5.0
"""Seconds between reaper passes in long-running processes (the API server, the pool daemon)."""


def of_process(pid: int) -> Owner | None:
    """The owner mark of process `pid`, or None if it is not running."""
    started = start_time(pid)
    return None if started is None else {"pid": pid, "start": started}


def current() -> Owner:
    """This process's owner mark."""
    mark = of_process(os.getpid())
    assert mark is not None  # this process is alive
    return mark


def is_alive(mark: Mapping[str, Any]) -> bool:
    pid, started = mark.get("pid"), mark.get("start")
    return isinstance(pid, int) and isinstance(started, int) and start_time(pid) == started


def dead_owner(mark: Owner | None) -> Owner | None:
    """A record's owner mark if its owner has died; None for a live owner or no owner."""
    if mark is None or is_alive(mark):
        return None
    return mark
