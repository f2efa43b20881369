"""Boot the built kernel with the `base` image under QEMU microvm and talk to the agent."""

from __future__ import annotations

import time

import pytest

from agentkernel.errors import ExecError
from tests.vm.conftest import BootedVM, connected, run_async

pytestmark = pytest.mark.vm


def test_agent_answers_ping_and_exec(vm: BootedVM) -> None:
    async def body() -> None:
        start = time.monotonic()
        async with connected(vm) as conn:
            boot = time.monotonic() - start
            assert "agentkernel" in conn.agent_info
            assert await conn.ping() < 5
            done = await conn.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (done.stdout, done.stderr, done.status.exit_code) == (b"out\n", b"err\n", 3)
            uname = await conn.run(["uname", "-r"])
            assert uname.stdout.startswith(b"6.1")
            print(f"boot to agent answer: {boot:.2f}s")

    run_async(body())


def test_missing_program_is_an_exec_error(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            with pytest.raises(ExecError) as info:
                await conn.exec(["/no/such/program"])
            assert info.value.errno == 2

    run_async(body())


def test_stdin_and_large_output(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            data = bytes(range(256)) * 4096  # 1 MiB, every byte value
            echoed = await conn.run(["cat"], stdin=data)
            assert echoed.stdout == data
            big = await conn.run(["sh", "-c", "yes abcdefghi | head -c 10000000"])
            assert big.stdout == b"abcdefghi\n" * 1_000_000

    run_async(body())


def test_guest_is_its_own_machine(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            mounts = (await conn.run(["cat", "/proc/mounts"])).stdout.decode()
            for point in ("/proc", "/sys", "/dev", "/dev/pts", "/tmp"):
                assert f" {point} " in mounts, point
            assert (await conn.run(["cat", "/proc/1/comm"])).stdout.strip() == b"agentkernel-age"
            assert (await conn.run(["hostname"])).stdout.strip() == b"testvm"  # set from HELLO

    run_async(body())
