"""Fixtures: stand-in guests (tests/hostile/guest.py) in processes of their own, and tracemalloc."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentkernel.protocol.connection import Connection
from tests.conftest import REPO
from tests.vm.conftest import artifacts  # noqa: F401  (fixture, for the real VM's test)

Guests = Callable[[str], Path]


@pytest.fixture
def guests() -> Iterator[Guests]:
    """Starts a guest of the named behaviour and gives the path of its socket; all are killed after."""
    rundir = Path(tempfile.mkdtemp(prefix="akh-"))  # short: Unix socket paths are limited
    procs: list[subprocess.Popen[bytes]] = []

    def start(behaviour: str) -> Path:
        sock = rundir / f"{len(procs)}-{behaviour}.sock"
        proc = subprocess.Popen([sys.executable, "-m", "tests.hostile.guest", str(sock), behaviour], cwd=REPO)
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the {behaviour} guest did not start")
            time.sleep(0.02)
        return sock

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on for one test: what this process (the host side) allocates is counted."""
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


async def steady_work(conn: Connection, stop: asyncio.Event) -> int:
    """Commands and pings on a connection to the well-behaved guest until `stop` (at least one round):
    what must go on unaffected while another connection misbehaves. Returns the rounds done."""
    rounds = 0
    while not stop.is_set() or rounds == 0:
        echoed = await conn.run(["echo", "steady", str(rounds)])
        assert echoed.stdout == f"steady {rounds}\n".encode()
        emitted = await conn.run(["emit", "4096"])
        assert emitted.stdout == b"y" * 4096
        await conn.ping()
        rounds += 1
        await asyncio.sleep(0.02)
    return rounds
