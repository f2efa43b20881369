"""Pause, resume and lifetimes of real QEMU sandboxes: the CLI's `pause`, `resume` and `update`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agentkernel import procs
from agentkernel.service.service import CommandSpec, SandboxService, call, collect
from tests.conftest import cli

pytestmark = pytest.mark.vm

COUNTER = "echo $$ > /tmp/pid; i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.2; done"
PAUSED_FOR = 4.0
"""Seconds a test keeps the sandbox paused: 20 ticks of the counter, were it running."""


def ok(*args: str) -> bytes:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def shown(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(ok("list", "--json"))
    return next(s for s in found if s["name"] == name)


async def read(service: SandboxService, name: str, path: str) -> int:
    """The number in a file in the guest (0 while it is not there yet)."""
    done = await collect(await service.exec(name, CommandSpec.checked(["cat", path])), limit=64)
    return int(done.stdout or b"0")


def test_pause_keeps_processes_and_resume_continues_them(cli_home: Path) -> None:
    ok("create", "--backend", "qemu", "--no-network", "box")
    ok("start", "box")

    async def before_pause(service: SandboxService) -> tuple[int, int]:
        await service.start_command("box", CommandSpec.checked(["sh", "-c", COUNTER]))
        while await read(service, "box", "/tmp/c") < 3:  # it runs
            await asyncio.sleep(0.2)
        pid, count = await read(service, "box", "/tmp/pid"), await read(service, "box", "/tmp/c")
        assert (await service.pause("box")).status == "paused"
        return pid, count

    async def resumed(service: SandboxService) -> tuple[int, int]:
        assert (await service.resume("box")).status == "running"
        return await read(service, "box", "/tmp/pid"), await read(service, "box", "/tmp/c")

    pid, before = call(before_pause)
    assert shown("box")["status"] == "paused"
    refused = cli("exec", "box", "--", "true")
    assert refused.returncode != 0 and "paused" in refused.stderr.decode()
    time.sleep(PAUSED_FOR)  # host time passes; the guest's does not
    same_pid, after = call(resumed)
    assert same_pid == pid  # the same process, not a new one
    assert after - before < 8, (before, after)  # far fewer than the 20 ticks a running guest makes
    time.sleep(1.0)
    assert call(lambda service: read(service, "box", "/tmp/c")) > after  # and it counts on

    ok("pause", "box")
    ok("resume", "box")
    assert shown("box")["status"] == "running"
    ok("pause", "box")
    ok("stop", "box")  # a paused sandbox stops cleanly
    assert shown("box")["status"] == "stopped"


def test_update_lifetime_extends_and_shortens(cli_home: Path) -> None:
    ok("create", "--backend", "qemu", "--no-network", "--lifetime", "10", "box")
    ok("start", "box")
    first_deadline = time.monotonic() + 10  # at the latest
    vmm = shown("box")["pid"]
    ok("update", "box", "--lifetime", "60")
    left = shown("box")["lifetime_left_s"]
    assert 50 < left <= 60
    time.sleep(max(0.0, first_deadline - time.monotonic()) + 3)  # the first watchdog reads the new one
    assert procs.running(vmm)
    assert ok("exec", "box", "--", "echo", "alive") == b"alive\n"

    ok("update", "box", "--lifetime", "1")
    deadline = time.monotonic() + 10
    while procs.running(vmm):  # killed by a watchdog, with nobody reading the record
        assert time.monotonic() < deadline, "the shortened lifetime did not stop the VM"
        time.sleep(0.1)
    record = shown("box")
    assert (record["status"], record["stop_reason"]) == ("stopped", "lifetime exceeded")

    bad = cli("update", "box", "--lifetime", "-1")
    assert bad.returncode != 0 and "--lifetime" in bad.stderr.decode()
