"""A `start` killed the moment its VMM appears leaves no VMM that nothing can find.

The record says `starting`, with its starter, from before the VMM is spawned; once the starter is
dead, reading the record kills the VMM (found by its run directory) and shows the sandbox failed.
`rm -f` of such a sandbox ends its VMM before its files go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkernel.sandbox import state
from agentkernel.service import owners, sandboxes
from tests.conftest import cli

pytestmark = pytest.mark.vm

TRIES = 5
TIMEOUT = 120.0


def forks(home: Path) -> list[int]:
    """QEMU processes of data dir `home` that resume a snapshot (started with -incoming)."""
    return [pid for pid, args in vmms(home).items() if b"-incoming" in args]


def vmms(home: Path) -> dict[int, list[bytes]]:
    """QEMU processes running a sandbox disk of data dir `home`: pid -> command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and any(str(home).encode() in a for a in args):
            found[int(proc.name)] = args
    return found


def vmm_rundirs(home: Path) -> dict[int, Path]:
    """QEMU processes of data dir `home`: pid -> run dir (from -pidfile)."""
    return {
        pid: Path(os.fsdecode(args[args.index(b"-pidfile") + 1])).parent for pid, args in vmms(home).items()
    }


def kill_when_the_vmm_appears(home: Path, *args: str) -> subprocess.Popen[bytes]:
    """Run the CLI and SIGKILL it the instant a QEMU process of `home` shows in /proc."""
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not vmm_rundirs(home):
        if proc.poll() is not None:
            pytest.fail(f"`{' '.join(args)}` ended before its VMM appeared: {proc.communicate()[1]!r}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no VMM appeared within {TIMEOUT:g}s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def shown(name: str) -> dict[str, object]:
    result = cli("list", "--json", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    records: dict[str, dict[str, object]] = {s["name"]: s for s in json.loads(result.stdout)}
    return records[name]


def test_start_killed_when_its_vmm_appears(cli_home: Path) -> None:
    name = "box"
    assert cli("create", "--backend", "qemu", "--no-network", name).returncode == 0
    workdir = cli_home / "sandboxes" / name
    for attempt in range(TRIES):
        kill_when_the_vmm_appears(cli_home, "start", name)
        if attempt % 2 == 0:
            # Reading the record: the start was interrupted, its VMM is killed.
            record = shown(name)
            assert record["status"] == "failed", record
            assert record["pid"] is None and record["stop_reason"] == sandboxes.INTERRUPTED, record
            assert not vmm_rundirs(cli_home), f"try {attempt + 1}: a VMM runs that its record lost"
            assert state.get(name).starter is None
        else:
            # `rm -f` straight away ends the VMM before it deletes the sandbox's files.
            rundir = Path(state.get(name).rundir)
            result = cli("rm", "-f", name, timeout=TIMEOUT)
            assert result.returncode == 0, result.stderr.decode()
            assert not vmm_rundirs(cli_home), f"try {attempt + 1}: `rm -f` left the VMM running"
            assert not rundir.exists() and not workdir.exists()
            assert cli("create", "--backend", "qemu", "--no-network", name).returncode == 0
    # The sandbox is not damaged by it: it starts and runs.
    assert cli("start", name, timeout=TIMEOUT).returncode == 0
    assert cli("exec", name, "--", "true", timeout=TIMEOUT).returncode == 0
    assert shown(name)["status"] == "running"


def test_a_live_starter_shows_starting(cli_home: Path) -> None:
    """While its starter lives, a `starting` record is left alone (its VMM is not the reader's to kill),
    and `rm` without --force refuses it."""
    name = "box"
    assert cli("create", "--backend", "qemu", "--no-network", name).returncode == 0
    starter = subprocess.Popen(["sleep", "60"])
    try:
        mark = owners.of_process(starter.pid)
        state.update(name, status="starting", starter=mark)
        assert shown(name)["status"] == "starting"
        result = cli("rm", name, timeout=TIMEOUT)
        assert result.returncode == 1 and b"is starting" in result.stderr, result.stderr
    finally:
        starter.kill()
        starter.wait()
    # Its starter gone, the start counts as interrupted.
    after = shown(name)
    assert after["status"] == "failed" and after["stop_reason"] == sandboxes.INTERRUPTED


def scratch_snapshots(home: Path) -> list[str]:
    directory = home / "snapshots"
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.is_dir() else []


POOL = ("daemon", "start", "--backend", "qemu", "--no-network", "--size", "1")


@pytest.mark.parametrize("moment", ["template written", "fork spawned"])
def test_pool_daemon_killed_while_making(cli_home: Path, moment: str) -> None:
    """The daemon dies halfway through a template (its snapshot half written) or a fork (its VMM just
    spawned); a new daemon removes what it left, and after `daemon stop` no VMM and no file is left."""
    try:
        assert cli(*POOL, timeout=TIMEOUT).returncode == 0
        pid = int((cli_home / "daemon.pid").read_text())

        def caught() -> bool:
            if moment == "template written":
                return bool(scratch_snapshots(cli_home))
            return bool(forks(cli_home))

        deadline = time.monotonic() + TIMEOUT
        while not caught():
            assert time.monotonic() < deadline, f"the daemon never reached: {moment}"
        os.kill(pid, signal.SIGKILL)
        assert vmm_rundirs(cli_home), "the daemon left no VMM behind: the test missed its moment"
        if moment == "template written":
            assert scratch_snapshots(cli_home)

        assert cli(*POOL, timeout=TIMEOUT).returncode == 0
    finally:
        result = cli("daemon", "stop", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    assert not vmm_rundirs(cli_home), "a VMM outlived the daemon that made it"
    assert not scratch_snapshots(cli_home), "a half-written snapshot was kept"
    assert json.loads(cli("list", "--all", "--json").stdout) == []
