"""The warm pool daemon with real sandboxes: each handed out once, replaced, adopted after a restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentkernel.pool import wire
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import SandboxService
from tests.conftest import cli

pytestmark = pytest.mark.vm


def ok(*args: str) -> str:
    result = cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def one_line_error(*args: str) -> str:
    result = cli(*args, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def status() -> dict[str, Any]:
    return json.loads(ok("daemon", "status", "--json"))


def ready(current: dict[str, Any] | None = None) -> list[str]:
    current = current or status()
    return [entry["name"] for entry in current["pools"][0]["ready"]]


def names(*flags: str) -> set[str]:
    return {s["name"] for s in json.loads(ok("list", "--json", *flags))}


def vmm_pids(home: Path) -> set[int]:
    """QEMU processes running a sandbox of this data dir."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"qemu-system" in cmdline and str(home).encode() in cmdline:
            found.add(int(proc.name))
    return found


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


async def hostname_through_the_service(project: Path) -> str:
    async with SandboxService(project) as service:
        request = await service.resolve(SandboxFlags(image="base"), command=["hostname"])
        async with service.ephemeral(request) as (_name, conn):
            done = await conn.run(["hostname"])
    return done.stdout.decode().strip()


@pytest.fixture
def pool_home(cli_home: Path) -> Iterator[Path]:
    yield cli_home
    cli("daemon", "stop", timeout=120)


def test_pool_hands_out_each_sandbox_once(pool_home: Path) -> None:
    ok("daemon", "start", "--image", "base", "--size", "2", "--wait")  # as `run` makes them: QEMU, network
    pooled = set(ready())
    assert len(pooled) == 2
    assert names() == set() and names("--all") == pooled  # kept ready, hidden from a plain list
    assert json.loads(ok("status", "--json"))["pool"]["ready"] == {"base": 2}
    assert {s["name"] for s in json.loads(ok("snapshot", "list", "--json"))} == {
        "pool-template-" + status()["pools"][0]["key"]
    }

    # The guest's hostname is its sandbox's name: each run is served by a pooled one, never twice.
    first = ok("run", "--", "hostname").strip()
    assert first in pooled
    second = ok("run", "--", "sh", "-c", "hostname; echo $http_proxy").split()
    assert second[0] in pooled and second[0] != first
    # The default profile's network, through its gateway (the proxy address names the command).
    assert re.fullmatch(r"http://c-[0-9a-f]{8}:agentkernel@10\.0\.2\.100:3128", second[1]), second[1]
    assert not {first, second[0]} & names("--all")  # removed after use
    wait_for(lambda: len(ready()) == 2, "the pool to refill")
    assert not {first, second[0]} & set(ready())
    assert status()["pools"][0]["handed_out"] == 2

    cold = ok("run", "--no-pool", "--", "hostname").strip()
    assert cold.startswith("run-") and cold not in pooled
    ok("run", "--memory", "256", "--", "true")  # a kind the pool does not keep
    current = status()
    assert current["pools"][0]["handed_out"] == 2 and current["misses"] == 1

    # The HTTP API's and the MCP server's one-command runs go through the same service call.
    via_service = asyncio.run(hostname_through_the_service(pool_home))
    assert via_service in set(ready(current))
    assert status()["pools"][0]["handed_out"] == 3

    ok("daemon", "stop")
    assert names("--all") == set()
    assert json.loads(ok("snapshot", "list", "--json")) == []
    assert vmm_pids(pool_home) == set()
    assert not wire.socket_path().exists() and not wire.pid_file().exists()
    assert cli("daemon", "status").returncode == 1


def test_pool_replaces_dead_and_old_sandboxes_and_is_adopted_after_a_restart(pool_home: Path) -> None:
    start = ("daemon", "start", "--image", "base", "--backend", "qemu", "--no-network", "--size", "2",
             "--health-interval", "1")  # fmt: skip
    ok(*start, "--wait")
    before = ready()
    victim = next(s for s in json.loads(ok("list", "--all", "--json")) if s["name"] == before[0])
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: before[0] not in ready() and len(ready()) == 2, "the dead sandbox to be replaced")
    assert before[0] not in names("--all")
    survivors = set(ready())

    # The daemon dies; its ready sandboxes run on, and a new daemon takes them back.
    daemon_pid = status()["pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: cli("daemon", "status").returncode != 0, "the daemon to be gone")
    assert names("--all") == survivors
    vmms = vmm_pids(pool_home)
    ok(*start, "--wait")
    assert set(ready()) == survivors
    assert vmm_pids(pool_home) == vmms  # adopted, not booted again, none orphaned
    assert ok("run", "--backend", "qemu", "--no-network", "--", "hostname").strip() in survivors
    ok("daemon", "stop")

    ok("daemon", "start", "--image", "base", "--backend", "qemu", "--no-network", "--size", "1",
       "--max-age", "2", "--health-interval", "0.5", "--wait")  # fmt: skip
    first = ready()
    wait_for(lambda: ready() and ready() != first, "a sandbox past its maximum age to be replaced")
    assert not set(first) & names("--all")


def test_daemon_usage_errors(pool_home: Path) -> None:
    assert cli("daemon", "status").returncode == 1
    assert "not running" in one_line_error("daemon", "stop")
    assert "no image" in one_line_error("daemon", "start", "--image", "no-such-image").lower()
    assert "unknown security profile" in one_line_error("daemon", "start", "--profile", "lax")
    assert "cannot be pooled" in one_line_error("daemon", "start", "--profile", "permissive")
    old_log = pool_home / "logs" / "daemon.log"
    old_log.parent.mkdir(exist_ok=True)
    old_log.write_bytes(b"x" * (5 << 20))  # a large log from earlier runs
    ok("daemon", "start", "--image", "base", "--backend", "qemu", "--no-network", "--size", "1")
    assert "already running" in one_line_error("daemon", "start")
    assert (pool_home / "logs" / "daemon.log.1").stat().st_size == 5 << 20  # kept once, not appended to
    assert old_log.stat().st_size < 1 << 20


def test_the_pool_follows_the_project_config(pool_home: Path) -> None:
    # Started in a project, the pool's sandboxes get its settings, so `run` there can take them.
    Path("agentkernel.toml").write_text(
        "[resources]\nmemory_mb = 256\n[security]\nnetwork = false\n"
        '[security.domains]\nallow = ["pypi.org"]\n[pool]\nimages = ["base"]\n'
    )
    ok("daemon", "start", "--size", "1", "--wait")
    pooled = ready()
    assert status()["pools"][0]["memory_mb"] == 256 and status()["pools"][0]["network"] is False
    assert ok("run", "--", "hostname").strip() in pooled
    assert status()["misses"] == 0


def test_run_in_a_python_project_takes_a_pooled_python_sandbox(pool_home: Path) -> None:
    # There `run` chooses `python` whatever the command; `node` for a node command. The daemon keeps
    # every installed image `run` would choose there, one template each.
    Path("pyproject.toml").write_text("[project]\nname = 'x'\n")
    ok("daemon", "start", "--backend", "qemu", "--no-network", "--size", "1", "--wait")
    pools = {pool["image"]: pool for pool in status()["pools"]}
    assert next(iter(pools)) == "python" and "base" not in pools, list(pools)
    templates = {s["name"] for s in json.loads(ok("snapshot", "list", "--json"))}
    assert templates == {"pool-template-" + pool["key"] for pool in pools.values()}
    pooled = {pool["ready"][0]["name"] for pool in pools.values()}

    assert ok("run", "--backend", "qemu", "--no-network", "--", "hostname").strip() in pooled
    current = status()
    assert current["misses"] == 0
    assert {p["image"]: p["handed_out"] for p in current["pools"]}["python"] == 1


def test_a_killed_daemon_leaves_nothing_running(pool_home: Path) -> None:
    # Killed while it makes sandboxes side by side: what it made or was making is removed by
    # `doctor --repair` (no daemon came after it to adopt them), and no VMM is left running.
    ok("daemon", "start", "--image", "base=4", "--parallel", "2", "--backend", "qemu", "--no-network")
    wait_for(lambda: status()["pools"][0]["making"] > 0 and ready(), "makes in flight", timeout=120)
    daemon_pid = status()["pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: cli("daemon", "status").returncode != 0, "the daemon to be gone")
    assert names("--all") and vmm_pids(pool_home)
    report = cli("doctor", "--repair", timeout=120)
    assert b"outlived its owner" in report.stdout, report.stdout.decode()
    wait_for(lambda: not vmm_pids(pool_home), "every VMM to be gone", timeout=30)
    assert names("--all") == set()
