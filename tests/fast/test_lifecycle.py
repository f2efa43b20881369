"""The sandbox life cycle through the service (`sandboxes`), on the fake backend."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from agentkernel import procs
from agentkernel.errors import AgentkernelError
from agentkernel.service import owners, sandboxes
from tests.conftest import REPO


async def run(name: str, *argv: str) -> tuple[int | None, bytes]:
    async with sandboxes.session(name) as conn:
        done = await conn.run(list(argv))
    return done.status.exit_code, done.stdout


def test_create_start_exec_stop_remove() -> None:
    record = sandboxes.create("box")
    assert (record.status, record.backend) == ("stopped", "fake")
    assert [r.name for r in sandboxes.list_sandboxes()] == ["box"]

    started = asyncio.run(sandboxes.start("box"))
    assert started.status == "running" and started.pid is not None
    assert asyncio.run(run("box", "echo", "hello")) == (0, b"hello\n")
    assert asyncio.run(run("box", "sh", "-c", "echo $HOME; exit 3")) == (3, b"\n")

    async def files() -> bytes:
        async with sandboxes.session("box") as conn:
            await conn.write_file("/root/note", _once(b"kept on the disk"))
            return b"".join([chunk async for chunk in conn.read_file("/root/note")])

    assert asyncio.run(files()) == b"kept on the disk"

    stopped = asyncio.run(sandboxes.stop("box"))
    assert stopped.status == "stopped" and not procs.running(started.pid)
    assert sandboxes.get("box").status == "stopped"  # powered off: not failed

    asyncio.run(sandboxes.start("box"))  # the disk outlives a stop
    assert asyncio.run(run("box", "cat", "/root/note")) == (0, b"kept on the disk")

    with pytest.raises(AgentkernelError, match="is running: stop it first"):
        sandboxes.remove("box")
    pid = sandboxes.get("box").pid
    sandboxes.remove("box", force=True)
    assert sandboxes.list_sandboxes() == []
    assert pid is not None and not procs.running(pid)


def test_name_taken_and_invalid() -> None:
    sandboxes.create("box")
    with pytest.raises(AgentkernelError, match="box"):
        sandboxes.create("box")
    with pytest.raises(AgentkernelError, match="invalid sandbox name"):
        sandboxes.create("../escape")
    assert [r.name for r in sandboxes.list_sandboxes()] == ["box"]


def test_start_twice_is_refused() -> None:
    sandboxes.create("box")
    asyncio.run(sandboxes.start("box"))
    with pytest.raises(AgentkernelError, match="already running"):
        asyncio.run(sandboxes.start("box"))


def test_reconcile_after_the_vmm_dies() -> None:
    sandboxes.create("box")
    pid = asyncio.run(sandboxes.start("box")).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while procs.running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    record = sandboxes.get("box")
    assert (record.status, record.pid) == ("failed", None)
    assert "ended without a shutdown" in str(record.stop_reason)
    with pytest.raises(AgentkernelError, match="not running"):
        asyncio.run(run("box", "true"))
    asyncio.run(sandboxes.start("box"))  # a failed sandbox boots again
    assert asyncio.run(run("box", "echo", "back")) == (0, b"back\n")


def test_reaper_removes_the_sandbox_of_a_dead_owner() -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=REPO)
    try:
        mark = owners.of_process(owner.pid)
        assert mark is not None
        sandboxes.create("orphan")
        asyncio.run(sandboxes.start("orphan"))
        pid = sandboxes.get("orphan").pid
        sandboxes.set_owner("orphan", mark)
        sandboxes.create("kept")
        assert sandboxes.reap() == []  # its owner lives
    finally:
        owner.kill()
        owner.wait()
    assert [r.name for r in sandboxes.list_sandboxes()] == ["kept"]  # list reaps first
    assert pid is not None and not procs.running(pid)


def test_lifetime_stops_the_sandbox() -> None:
    sandboxes.create("brief", lifetime=1)
    asyncio.run(sandboxes.start("brief"))
    deadline = time.monotonic() + 10
    while sandboxes.get("brief").status == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    record = sandboxes.get("brief")
    assert (record.status, record.stop_reason) == ("stopped", "lifetime exceeded")


async def _once(data: bytes):  # type: ignore[no-untyped-def]
    yield data
