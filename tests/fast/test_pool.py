"""The pool daemon's logic on the fake backend: ready sandboxes (forked from a template snapshot)
handed out to a run, each once, and refilled."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from agentkernel.client import Client
from agentkernel.pool import daemon, wire
from agentkernel.service import sandboxes, snapshots


def ready(pool: daemon.Pool, count: int) -> list[str]:
    """The names of the pool's ready sandboxes, once there are `count` (within 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        slot: dict[str, Any] = pool.status()["pools"][0]
        if len(slot["ready"]) >= count:
            return [entry["name"] for entry in slot["ready"]]
        assert time.monotonic() < deadline, slot
        time.sleep(0.05)


def test_run_takes_a_ready_sandbox(pool: daemon.Pool, api: str) -> None:
    first = ready(pool, 2)
    key = pool.slots[0].key
    assert key is not None
    assert [s.name for s in snapshots.list_snapshots()] == [daemon.TEMPLATE_PREFIX + key]  # forks of it
    assert wire.request({"op": "status"})["pools"][0]["handed_out"] == 0

    with Client(api) as ak:
        done = ak.run(["sh", "-c", "cat /proc/uptime; ls /"])
        assert done.exit_code == 0 and "workspace" in done.stdout
        assert ak.list_sandboxes() == []  # pooled ones are not listed, the one it took is removed

    status = pool.status()["pools"][0]
    assert status["handed_out"] == 1 and status["empty_acquires"] == 0
    refilled = ready(pool, 2)
    assert len(set(refilled) - set(first)) == 1  # the one handed out was replaced by a new one


def test_a_ready_sandbox_that_died_is_replaced(pool: daemon.Pool) -> None:
    victim, survivor = ready(pool, 2)
    pid = sandboxes.get(victim).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # its VMM dies while it waits in the pool
    deadline = time.monotonic() + 20
    while victim in ready(pool, 2) or len(ready(pool, 2)) < 2:
        assert time.monotonic() < deadline, pool.status()
        time.sleep(0.05)
    assert survivor in ready(pool, 2)
    assert victim not in [r.name for r in sandboxes.list_sandboxes(pooled=True)]  # removed, not left failed
