"""The VM dies under a running command: its VMM killed on the host, a guest kernel panic, the agent
(the guest's PID 1) crashing. The command's client gets one line saying so, the sandbox shows as failed
with the reason, and `rm` leaves nothing behind."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from tests.conftest import cli
from tests.faults.conftest import TIMEOUT, Running, error_line, ok, read_line, sandbox, spawn

pytestmark = pytest.mark.vm

# Overwrites the agent's code (PID 1's executable mapping) with zeros through /proc/1/mem, as a
# debugger writes breakpoints; the agent crashes the next time it runs, which the echo brings about.
CRASH_AGENT = """
range=$(awk '/r-xp/ && /agentkernel-agent/ {print $1; exit}' /proc/1/maps)
start=$((0x${range%-*})) end=$((0x${range#*-}))
dd if=/dev/zero of=/proc/1/mem bs=4096 seek=$((start / 4096)) count=$(((end - start) / 4096)) \
   conv=notrunc 2>/dev/null || exit 90
echo overwritten
sleep 30
"""
# The guest kernel has no magic SysRq key, so the panic is an OOM one: panic_on_oom=2 makes every memory
# cgroup OOM panic the kernel, and two 300 MiB buffers exceed the sandbox's 512 MiB.
PANIC_ON_OOM = """
echo 2 > /proc/sys/vm/panic_on_oom
dd if=/dev/zero of=/dev/null bs=300M count=1 & dd if=/dev/zero of=/dev/null bs=300M count=1
wait
"""


def assert_failed_and_removed(box: Running, error: str) -> str:
    """The sandbox is listed as failed with the reason the client got; `rm` then leaves nothing."""
    listed = sandbox(box.name)
    assert (listed["status"], listed["pid"]) == ("failed", None)
    reason = listed["stop_reason"]
    assert isinstance(reason, str)
    assert error == f"sandbox '{box.name}' failed: {reason}"
    ok("rm", box.name)
    assert box.leftovers() == []
    return reason


def test_vmm_killed_during_exec(boot: Callable[..., Running]) -> None:
    box = boot("box")
    client = spawn("exec", box.name, "--", "sh", "-c", "echo started; sleep 600")
    assert read_line(client) == b"started\n"
    os.kill(box.pid, signal.SIGKILL)
    out, err = client.communicate(timeout=60)
    assert (client.returncode, out) == (1, b"")
    reason = assert_failed_and_removed(box, error_line(err))
    assert reason == "its VMM process ended without a shutdown (killed, or crashed)"


def test_guest_kernel_panic(boot: Callable[..., Running]) -> None:
    box = boot("box")
    result = cli("exec", box.name, "--", "sh", "-c", PANIC_ON_OOM, timeout=TIMEOUT)
    assert result.returncode == 1
    error = error_line(result.stderr)
    assert error.endswith(
        "failed: the guest kernel panicked: Out of memory: compulsory panic_on_oom is enabled"
    )
    assert b"Kernel panic - not syncing: Out of memory" in ok("logs", box.name)
    assert_failed_and_removed(box, error)


def test_agent_crash(boot: Callable[..., Running]) -> None:
    box = boot("box")
    result = cli("exec", box.name, "--", "sh", "-c", CRASH_AGENT, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (1, b"")
    error = error_line(result.stderr)
    # exitcode=0x0000000b: SIGSEGV, unless the agent ran into its code while it was half overwritten
    assert "failed: the guest agent (PID 1) died and the guest kernel panicked: " in error
    assert "Attempted to kill init! exitcode=0x" in error
    assert b"Attempted to kill init!" in ok("logs", box.name)
    assert_failed_and_removed(box, error)


def test_agent_is_immune_to_kill_from_the_guest(boot: Callable[..., Running]) -> None:
    """The kernel drops signals to a pid namespace's init that it has no handler for, SIGKILL included,
    so a guest process cannot kill the agent that way: the sandbox carries on."""
    box = boot("box")
    assert ok("exec", box.name, "--", "sh", "-c", "kill -KILL 1; kill -TERM 1; kill -STOP 1; echo sent") == (
        b"sent\n"
    )
    assert ok("exec", box.name, "--", "cat", "/proc/1/comm") == b"agentkernel-age\n"
    assert sandbox(box.name)["status"] == "running"
    ok("rm", "-f", box.name)
    assert box.leftovers() == []
