"""Nothing a client started outlives it: owner records, the reaper, and clean exits on signals.

Each test drives the real CLI (or the real agent-run code) in a subprocess with real VMs, ends it the
way a user or the system would, and measures how long the sandbox's VMM (its pid in the record) and
its record live on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentkernel.sandbox import state
from agentkernel.service import audit, owners, sandboxes
from agentkernel.service.service import take_over
from tests.conftest import cli

pytestmark = pytest.mark.vm

RUN = [sys.executable, "-m", "agentkernel", "run", "--backend", "qemu", "--no-network", "--no-pool"]
STARTED = ["sh", "-c", "echo started; exec sleep 100"]
GRACEFUL = 5.0
REAPED = 30.0


def vmm_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


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


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `predicate` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout:g}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def gone(name: str, pid: int) -> Callable[[], bool]:
    return lambda: not vmm_alive(pid) and not state.exists(name)


def only_sandbox() -> tuple[str, int]:
    (record,) = state.all_records()
    assert record.status == "running" and record.pid is not None and vmm_alive(record.pid)
    return record.name, record.pid


def read_until(fd: int, marker: bytes, timeout: float = 180) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"no {marker!r} within {timeout:g}s; output so far: {seen[-500:]!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"output ended before {marker!r}: {seen[-500:]!r}")
        seen += chunk
    return seen


def start_run() -> tuple[subprocess.Popen[bytes], str, int]:
    """`agentkernel run` of a command that is running (it said so) in its own sandbox."""
    proc = subprocess.Popen([*RUN, "--", *STARTED], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), b"started")
    return proc, *only_sandbox()


# -- owner marks ------------------------------------------------------------------------------------


def test_an_owner_mark_names_one_process_and_a_zombie_is_dead() -> None:
    me = owners.current()
    assert me["pid"] == os.getpid() and owners.is_alive(me)
    assert not owners.is_alive({**me, "start": me["start"] + 1})  # the pid, reused by a later process
    assert not owners.is_alive({"pid": me["pid"]}) and owners.dead_owner(None) is None
    child = subprocess.Popen(["true"])
    wait_until(lambda: not vmm_alive(child.pid), 10, "the child to exit")  # a zombie until waited for
    assert Path(f"/proc/{child.pid}").exists() and owners.of_process(child.pid) is None
    child.wait()


def _create_in_child(owned: dict[str, bool], *, pool: str | None = None, boot: bool = False) -> None:
    """Sandboxes made (and booted, with `boot`) by a process that then exits: `owned` ones are
    orphans."""
    code = "import asyncio\nfrom agentkernel.service import sandboxes\n" + "".join(
        f"sandboxes.create({name!r}, backend='qemu', owned={mine}, pool={pool!r})\n"
        + (f"asyncio.run(sandboxes.start({name!r}))\n" if boot else "")
        for name, mine in owned.items()
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_reaper_removes_what_dead_owners_left_once_and_keeps_persistent_ones(cli_home: Path) -> None:
    sandboxes.create("mine", backend="qemu", owned=True)  # this process's: alive
    orphans = [f"orphan-{i}" for i in range(6)]
    _create_in_child({**dict.fromkeys(orphans, True), "persistent": False})
    reaped: list[list[str]] = [[], []]

    def reaper(i: int) -> None:
        reaped[i] = sandboxes.reap()

    threads = [threading.Thread(target=reaper, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reaped[0] + reaped[1]) == orphans  # each removed once, by one of the two
    assert {r.name for r in state.all_records()} == {"persistent", "mine"}
    assert sandboxes.reap() == []
    assert not any((cli_home / "sandboxes").glob("orphan-*"))  # their disks too


def test_a_dead_pool_daemons_sandboxes_wait_for_adoption_then_go(cli_home: Path) -> None:
    _create_in_child({"ready-1": True}, pool="somekey")
    assert sandboxes.reap() == []  # marked orphaned, kept for a new daemon
    mark = state.get("ready-1").owner
    assert "orphaned_at" in mark and sandboxes.reap() == []
    aged = {**mark, "orphaned_at": mark["orphaned_at"] - owners.ADOPT_GRACE - 1}
    state.update("ready-1", owner=aged)
    assert sandboxes.reap() == ["ready-1"]

    _create_in_child({"ready-2": True}, pool="somekey", boot=True)
    try:
        assert sandboxes.reap() == [] and "orphaned_at" in (state.get("ready-2").owner or {})
        assert take_over("ready-2", "somekey")  # a new daemon adopts it: now that daemon's
        assert state.get("ready-2").owner == owners.current()
        assert sandboxes.reap() == [] and state.get("ready-2").status == "running"
    finally:
        sandboxes.remove("ready-2", force=True)


# -- `agentkernel run` ------------------------------------------------------------------------------


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_run_removes_its_sandbox_on_a_signal(cli_home: Path, signo: signal.Signals) -> None:
    proc, name, pid = start_run()
    proc.send_signal(signo)
    took = wait_until(gone(name, pid), GRACEFUL, f"the sandbox gone after {signo.name}")
    assert proc.wait(timeout=30) == 128 + signo
    print(f"run, {signo.name}: VM gone after {took:.2f}s")


def test_run_signalled_while_booting_removes_its_sandbox(cli_home: Path) -> None:
    proc = subprocess.Popen([*RUN, "--", "sleep", "100"], stderr=subprocess.PIPE)
    wait_until(lambda: bool(state.all_records()), 180, "the sandbox to be made")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACEFUL * 2) == 128 + signal.SIGTERM
    assert state.all_records() == [] and not vmm_pids(cli_home)
    assert proc.stderr is not None and b"interrupted by SIGTERM" in proc.stderr.read()


def test_run_killed_outright_is_reaped_by_the_next_command(cli_home: Path) -> None:
    proc, name, pid = start_run()
    proc.kill()
    killed = time.monotonic()
    wait_until(lambda: proc.poll() is not None, 10, "the CLI to die")
    time.sleep(1)
    assert vmm_alive(pid) and state.exists(name)  # nothing else removes it
    result = cli("list")  # any command that reconciles state reaps
    assert result.returncode == 0, result.stderr.decode()
    wait_until(gone(name, pid), REAPED, "the sandbox gone after SIGKILL and `list`")
    print(f"run, SIGKILL then `list`: VM gone {time.monotonic() - killed:.2f}s after the kill")


# -- `agent run` -----------------------------------------------------------------------------------

AGENT_RUN = """
import sys
import typer
from pathlib import Path
from agentkernel.cli.agent_cmds import run_attached
from agentkernel.config import PROFILES
from agentkernel.service.request import SandboxRequest
request = SandboxRequest(
    image="base", backend="qemu", vcpus=2, memory_mb=2048, policy=PROFILES["restrictive"],
    mount_dir=None, lifetime=None,
)
try:
    code = run_attached(
        ["sh", "-c", "echo started; exec sleep 100"], env={}, workdir=None, request=request,
        project_dir=Path.cwd(),
    )
except typer.Exit as exc:
    code = exc.exit_code
sys.exit(code)
"""


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is this session's terminal: closing it hangs up


@pytest.mark.parametrize("how", ["SIGTERM", "hang-up"])
def test_agent_run_removes_its_sandbox_on_sigterm_and_hangup(cli_home: Path, how: str) -> None:
    """`agent run` needs an agent's image (built from the npm registry) and the network; its sandbox
    life cycle, `run_attached`, is driven here with a stand-in command on a real terminal (a pty)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_RUN],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=_take_terminal,
    )
    os.close(slave)
    try:
        read_until(master, b"started")
        name, pid = only_sandbox()
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.close(master)  # the terminal window closed: the kernel sends SIGHUP
            master = -1
        took = wait_until(gone(name, pid), GRACEFUL, f"the sandbox gone after {how}")
        expected = signal.SIGTERM if how == "SIGTERM" else signal.SIGHUP
        assert proc.wait(timeout=30) == 128 + expected
        print(f"agent run, {how}: VM gone after {took:.2f}s")
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- MCP run_command --------------------------------------------------------------------------------


def test_cancelled_mcp_run_command_removes_its_sandbox(cli_home: Path) -> None:
    """The SDK's client sends `notifications/cancelled` when a call is cancelled; the server's SDK then
    cancels the tool, and the tool's sandbox is removed."""
    from mcp import Client

    from tests.mcp.test_mcp_server import with_server

    took: list[float] = []

    async def body(client: Client) -> None:
        call = asyncio.create_task(
            client.call_tool("run_command", {"command": ["sleep", "100000"], "profile": "restrictive"})
        )
        await asyncio.to_thread(functools.partial(wait_until, _running_one, 180, "the sandbox running"))
        await asyncio.sleep(0.5)  # the command starts right after the boot
        name, pid = only_sandbox()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        took.append(await asyncio.to_thread(wait_until, gone(name, pid), GRACEFUL, "the sandbox gone"))
        await client.list_tools()  # the server still answers

    with_server(body, cli_home)
    print(f"MCP run_command cancelled: VM gone after {took[0]:.2f}s")


def _running_one() -> bool:
    """One sandbox, booted: the command it is for starts right after."""
    records = state.all_records()
    if len(records) != 1 or records[0].status != "running" or records[0].pid is None:
        return False
    return any(e["event"] == "start" and e.get("ok") for e in audit.entries(records[0].name))


def test_run_gives_up_on_a_command_that_ignores_the_signal(cli_home: Path) -> None:
    proc = subprocess.Popen(
        [*RUN, "--", "sh", "-c", "trap '' TERM; echo started; sleep 100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), b"started")
    name, pid = only_sandbox()
    proc.send_signal(signal.SIGTERM)
    took = wait_until(gone(name, pid), GRACEFUL, "the sandbox gone though its command ignores SIGTERM")
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert proc.stderr is not None and b"did not end within 3s of SIGTERM" in proc.stderr.read()
    print(f"run, SIGTERM ignored by the command: VM gone after {took:.2f}s")
