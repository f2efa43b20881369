"""Guest resource limits (HELLO's max_procs and memory_mb): a fork bomb and a memory hog in a real VM.

The agent puts every EXEC'd process into one cgroup v2 group with pids.max and memory.max; the agent
stays outside it, so it keeps answering while the sandbox's processes hit the limits.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from agentkernel.protocol.client import Connection
from tests.vm.conftest import BootedVM, run_async

pytestmark = pytest.mark.vm

MAX_PROCS = 24
MEMORY_MB = 96


async def limited(vm: BootedVM, **limits: int) -> Connection:
    """A connection whose HELLO carries the limits (the backend's own connect sends none)."""
    await (await vm.connect()).close()  # waits for the boot
    conn = await Connection.open_unix(vm.spec.rundir / "agent0.sock", shared_stream=True)
    await conn.hello(hostname=vm.spec.name, **limits)
    return conn


def test_limits_are_set_up_in_a_cgroup(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, max_procs=MAX_PROCS, memory_mb=MEMORY_MB)
        try:
            own = await conn.run(["cat", "/proc/self/cgroup"])
            assert own.stdout.decode().strip() == "0::/sandbox"
            pids = await conn.run(["cat", "/sys/fs/cgroup/sandbox/pids.max"])
            assert pids.stdout.decode().strip() == str(MAX_PROCS)
            memory = await conn.run(["cat", "/sys/fs/cgroup/sandbox/memory.max"])
            assert int(memory.stdout) == MEMORY_MB << 20
            agent = await conn.run(
                ["cat", "/proc/1/cgroup", "/proc/1/oom_score_adj", "/proc/self/oom_score_adj"]
            )
            assert agent.stdout.decode().split() == ["0::/", "-1000", "0"]
        finally:
            await conn.close()

    run_async(body())


def test_memory_max_stays_below_the_vm_memory(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, memory_mb=vm.spec.memory_mb)  # all of it: the agent must keep some
        try:
            memory = int((await conn.run(["cat", "/sys/fs/cgroup/sandbox/memory.max"])).stdout)
            total_kb = int((await conn.run(["sh", "-c", "grep MemTotal /proc/meminfo"])).stdout.split()[1])
            assert 16 << 20 <= memory <= total_kb * 1024 - (32 << 20)
        finally:
            await conn.close()

    run_async(body())


def test_fork_bomb_is_refused_and_the_agent_answers(vm: BootedVM) -> None:
    async def body() -> None:
        conn = await limited(vm, max_procs=MAX_PROCS)
        try:
            # It forks until the limit refuses (EAGAIN), and on until the timeout kills its group.
            bomb = await conn.run(["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 5"], timeout=8)
            assert b"Resource temporarily unavailable" in bomb.stderr, bomb.stderr[-500:]
            assert await conn.ping(timeout=30) < 30
            events = (await conn.run(["cat", "/sys/fs/cgroup/sandbox/pids.events"])).stdout.split()
            assert events[0] == b"max" and int(events[1]) > 0  # forks refused at the limit
            # The group kill took the whole bomb: the group empties and new commands run.
            for _ in range(100):
                current = int((await conn.run(["cat", "/sys/fs/cgroup/sandbox/pids.current"])).stdout)
                if current <= 2:
                    break
                await asyncio.sleep(0.1)
            assert current <= 2
            assert (await conn.run(["echo", "alive"])).stdout == b"alive\n"
        finally:
            await conn.close()

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
