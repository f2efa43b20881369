"""Guest resource limits in real VMs: the profile's process limit on every path that makes a sandbox,
fork bombs and memory hogs, and the agent answering throughout.

The agent runs every EXEC'd process in a cgroup v2 group of its own under /sys/fs/cgroup/sandbox, whose
pids.max and memory.max (from HELLO's max_procs and memory_mb) bound all the commands together; the
agent stays outside it, at a higher priority.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import pytest

from agentkernel.client import Client
from agentkernel.config import MAX_PROCS, PROFILES, Policy
from agentkernel.protocol.connection import Connection
from agentkernel.sandbox import state
from agentkernel.service import sandboxes
from tests.api.server import api_server
from tests.conftest import cli
from tests.vm.conftest import BootedVM, run_async

pytestmark = pytest.mark.vm

LIMITED_PROCS = 24
MEMORY_MB = 96
PIDS_MAX = "/sys/fs/cgroup/sandbox/pids.max"
FORK_BOMB = "f() { f | f & }; f"  # each f sends two more to the background


def ok(*args: str) -> bytes:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


async def limited(vm: BootedVM, port: int = 0, **limits: int) -> Connection:
    """A connection on agent port `port` whose HELLO carries these limits, or none (the backend's own
    connect sends the spec's). Port 0 first waits for the boot; another port is for a connection
    beside one on port 0."""
    if port == 0:
        await (await vm.connect()).close()
    conn = await Connection.open_unix(vm.spec.rundir / f"agent{port}.sock", shared_stream=True)
    await conn.hello(hostname=vm.spec.name, **limits)
    return conn


async def text(conn: Connection, *argv: str) -> str:
    return (await conn.run(list(argv))).stdout.decode().strip()


# ---- the limit travels with the policy -------------------------------------------------------------


def test_every_profile_has_its_own_process_limit() -> None:
    assert {name: policy.max_procs for name, policy in PROFILES.items()} == MAX_PROCS
    assert len(set(MAX_PROCS.values())) == 3  # so a test below can tell which one a sandbox got


def test_a_record_without_a_process_limit_gets_its_profiles(tmp_path: Path) -> None:
    """Records (and snapshots) written before policies carried the limit still start limited."""
    stored = sandboxes.policy_record(PROFILES["restrictive"])
    del stored["max_procs"]
    record = state.from_row(dict(
        name="old", backend="qemu", status="stopped", pid=None, rundir=str(tmp_path), created_at="",
        image="base", image_digest="", vcpus=1, memory_mb=256, profile="restrictive",
        extra=json.dumps({"kernel": "/k", "image_path": "/i", "policy": stored}),
    ))  # fmt: skip
    assert sandboxes.spec_of(record).max_procs == MAX_PROCS["restrictive"]
    assert Policy.from_record(json.loads(json.dumps(stored))) == PROFILES["restrictive"]


# ---- the guest side: one connection with explicit limits -------------------------------------------


def test_limits_are_set_up_in_a_cgroup(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, max_procs=LIMITED_PROCS, memory_mb=MEMORY_MB)
        try:
            assert re.fullmatch(r"0::/sandbox/\d+", await text(conn, "cat", "/proc/self/cgroup"))
            assert await text(conn, "cat", PIDS_MAX) == str(LIMITED_PROCS)
            memory = await text(conn, "cat", "/sys/fs/cgroup/sandbox/memory.max")
            assert int(memory) == MEMORY_MB << 20
            # The CPU controller reaches every command's group, each with the same weight.
            assert "cpu" in (await text(conn, "cat", "/sys/fs/cgroup/sandbox/cgroup.subtree_control")).split()
            assert (
                await text(
                    conn, "sh", "-c", 'cat "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpu.weight"'
                )
                == "100"
            )
            agent = await text(
                conn, "cat", "/proc/1/cgroup", "/proc/1/oom_score_adj", "/proc/self/oom_score_adj"
            )
            assert agent.split() == ["0::/", "-1000", "0"]
            # The agent runs at real-time priority (SCHED_FIFO), what it starts as usual (SCHED_OTHER):
            # the scheduling policy is field 41 of stat.
            stats = await text(conn, "cat", "/proc/1/stat", "/proc/self/stat")
            policies = [int(line.rsplit(")", 1)[1].split()[38]) for line in stats.splitlines()]
            assert policies == [1, 0]
        finally:
            await conn.close()

    run_async(body())


def test_a_hello_without_limits_still_limits_processes(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm)
        try:
            assert await text(conn, "cat", PIDS_MAX) == "1024"  # the agent's default, never "max"
        finally:
            await conn.close()

    run_async(body())


def test_memory_max_stays_below_the_vm_memory(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, memory_mb=vm.spec.memory_mb)  # all of it: the agent must keep some
        try:
            memory = int(await text(conn, "cat", "/sys/fs/cgroup/sandbox/memory.max"))
            total_kb = int((await text(conn, "sh", "-c", "grep MemTotal /proc/meminfo")).split()[1])
            assert 16 << 20 <= memory <= total_kb * 1024 - (32 << 20)
        finally:
            await conn.close()

    run_async(body())


def test_fork_bomb_is_refused_and_the_agent_answers(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, max_procs=LIMITED_PROCS)
        try:
            # It forks until the limit refuses (EAGAIN), and on until the timeout kills its group: its
            # main process lasts until then (`exec`, no fork needed, which the bomb may deny; a main
            # process that exited first would leave the bomb running, as any command's background).
            bomb = await conn.run(["sh", "-c", f"{FORK_BOMB}; exec sleep 60"], timeout=8)
            assert b"Resource temporarily unavailable" in bomb.stderr, bomb.stderr[-500:]
            assert await conn.ping(timeout=30) < 30
            events = (await conn.run(["cat", "/sys/fs/cgroup/sandbox/pids.events"])).stdout.split()
            assert events[0] == b"max" and int(events[1]) > 0  # forks refused at the limit
            # The timeout killed the command's cgroup: nothing of the bomb is left once the killed
            # processes have finished exiting (cgroup.kill does not wait for them).
            deadline = time.monotonic() + 30
            while (left := await text(conn, "cat", "/sys/fs/cgroup/sandbox/pids.current")) != "1":  # the cat
                assert time.monotonic() < deadline, f"{left} processes left"
                await asyncio.sleep(0.2)
            assert await text(conn, "echo", "alive") == "alive"
        finally:
            await conn.close()

    run_async(body(), timeout=600)


DAEMONS = "setsid sleep 600 & sleep 600 & echo started"  # one in a session of its own, one not


async def sleeps(conn: Connection) -> list[str]:
    return (await text(conn, "sh", "-c", "pidof sleep || true")).split()


@pytest.mark.parametrize("end", ["timeout", "cancel", "closed connection"])
def test_a_command_that_is_ended_takes_everything_it_started(vm: BootedVM, end: str) -> None:
    """Also a daemon in a session of its own, which a process-group kill would miss."""

    async def body() -> None:
        conn = await limited(vm)
        try:
            if end == "timeout":
                done = await conn.run(["sh", "-c", f"{DAEMONS}; sleep 600"], timeout=2)
                assert done.status.timed_out
            else:
                other = await limited(vm, port=1) if end == "closed connection" else conn
                proc = await other.exec(["sh", "-c", f"{DAEMONS}; sleep 600"])
                assert (await anext(proc.output())).data == b"started\n"
                assert len(await sleeps(conn)) == 3
                if end == "cancel":
                    await proc.signal(signal.SIGKILL)
                    assert (await proc.wait()).signal == signal.SIGKILL
                else:
                    await other.close()
            deadline = time.monotonic() + 10  # a closed connection is noticed a moment later
            while (left := await sleeps(conn)) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert left == []
        finally:
            await conn.close()

    run_async(body())


def test_what_a_command_leaves_running_outlives_it(vm: BootedVM) -> None:
    """A command that exits leaves its background processes running, daemons too, for the next
    commands to use; their group goes once they are gone."""

    async def body() -> None:
        conn = await limited(vm)
        try:
            done = await conn.run(["sh", "-c", DAEMONS], timeout=30)
            assert (done.status.exit_code, done.stdout) == (0, b"started\n")
            pids = await sleeps(conn)
            assert len(pids) == 2
            groups = await text(conn, "sh", "-c", f"cat /proc/{pids[0]}/cgroup /proc/{pids[1]}/cgroup")
            group = groups.splitlines()[0]
            assert groups.splitlines() == [group, group] and re.fullmatch(r"0::/sandbox/\d+", group)
            # Another connection, as the next `exec` makes, sees them too.
            other = await limited(vm, port=1)
            try:
                assert sorted(await sleeps(other)) == sorted(pids)
            finally:
                await other.close()
            assert sorted(await sleeps(conn)) == sorted(pids)
            await conn.run(["kill", "-9", *pids])
            while await sleeps(conn):
                await asyncio.sleep(0.1)
            # The next command's start removes the emptied group.
            path = "/sys/fs/cgroup" + group.removeprefix("0::")
            assert await text(conn, "sh", "-c", f"test -e {path} && echo kept || echo gone") == "gone"
        finally:
            await conn.close()

    run_async(body())


def test_a_slowly_growing_command_is_stopped_in_bounded_time(vm: BootedVM) -> None:
    """At memory.max the kernel reclaims program text that is read back in at once, and its OOM killer
    waits: the agent kills the largest process once the sandbox has thrashed for 2 s."""

    async def body() -> None:
        conn = await limited(vm, memory_mb=MEMORY_MB)
        try:
            grower = 'awk \'BEGIN { while (1) a[i++] = sprintf("%4000s", "") }\''
            started = time.monotonic()
            done = await conn.run(["sh", "-c", grower], timeout=300)
            took = time.monotonic() - started
            print(f"a slow memory grower was stopped after {took:.1f} s")
            assert done.status.signal == signal.SIGKILL, done
            assert took < 60
            assert await text(conn, "echo", "alive") == "alive"
        finally:
            await conn.close()
        assert b"memory pressure: the sandbox thrashed" in vm.spec.console_log.read_bytes()

    run_async(body(), timeout=600)


def test_memory_hog_is_killed_and_the_agent_answers(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, memory_mb=MEMORY_MB)
        try:
            # busybox dd allocates its block: twice the limit, filled from /dev/zero.
            hog = await conn.run(["dd", "if=/dev/zero", "of=/dev/null", f"bs={2 * MEMORY_MB}M", "count=1"])
            assert hog.status.signal == signal.SIGKILL, hog
            assert await conn.ping() < 10
            events = (await conn.run(["cat", "/sys/fs/cgroup/sandbox/memory.events"])).stdout.decode()
            assert "oom_kill 1" in events, events
            small = await conn.run(["dd", "if=/dev/zero", "of=/dev/null", f"bs={MEMORY_MB // 4}M", "count=1"])
            assert small.status.exit_code == 0
        finally:
            await conn.close()

    run_async(body())


# ---- every path that makes a sandbox sends its profile's limit --------------------------------------


@pytest.mark.parametrize("profile", list(PROFILES))
def test_cli_sandboxes_get_their_profiles_process_limit(cli_home: Path, profile: str) -> None:
    out = ok("run", "--profile", profile, "--", "cat", PIDS_MAX)
    assert out.decode().strip() == str(MAX_PROCS[profile])


def test_api_sandboxes_get_their_profiles_process_limit(cli_home: Path, tmp_path: Path) -> None:
    with api_server(tmp_path) as url, Client(url) as ak:
        assert ak.run(["cat", PIDS_MAX], profile="restrictive").stdout.strip() == "256"
        with ak.create_sandbox("box", profile="permissive") as box:
            assert box.exec(["cat", PIDS_MAX]).stdout.strip() == "4096"


def test_forks_get_the_process_limit_back(cli_home: Path) -> None:
    """A fork's HELLO sets the limit again, whatever the snapshot's guest had made of it."""
    ok("create", "--profile", "restrictive", "origin")
    ok("start", "origin")
    ok("exec", "origin", "--", "sh", "-c", f"echo max > {PIDS_MAX}")  # root in the guest may
    ok("snapshot", "create", "origin", "snap")
    ok("fork", "snap", "copy")
    assert ok("exec", "copy", "--", "cat", PIDS_MAX).decode().strip() == "256"


def test_a_server_started_by_one_exec_serves_the_next(cli_home: Path) -> None:
    """Start a server in the background, use it from the next `exec`: busybox httpd makes itself a
    daemon (a session of its own, its parent gone), as servers do."""
    ok("create", "--no-network", "srv")
    ok("start", "srv")
    page = "mkdir -p /tmp/www && echo served > /tmp/www/index.html"
    ok("exec", "srv", "--", "sh", "-c", f"{page} && httpd -p 127.0.0.1:8000 -h /tmp/www && echo started")
    assert ok("exec", "srv", "--", "wget", "-q", "-O", "-", "http://127.0.0.1:8000/") == b"served\n"
    # A plain background job, no daemon, lives on too.
    ok("exec", "srv", "--", "sh", "-c", "sleep 1000 >/dev/null 2>&1 &")
    assert ok("exec", "srv", "--", "pidof", "sleep").strip().isdigit()
