"""What /proc says of a process: live, ended (a zombie), reused pids, and processes that name a path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkernel import procs


def test_a_running_process_and_a_zombie() -> None:
    me = os.getpid()
    assert procs.running(me) and procs.start_time(me) is not None
    assert procs.session_of(me) == os.getsid(me)
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while procs.running(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped: a zombie
        time.sleep(0.01)
    assert not procs.running(child.pid) and procs.start_time(child.pid) is None
    assert Path(f"/proc/{child.pid}").exists()  # still there as a zombie
    child.wait()
    assert procs.argv(child.pid) == [] and procs.session_of(child.pid) is None


def test_start_time_tells_processes_apart() -> None:
    first = subprocess.Popen(["sleep", "30"])
    time.sleep(0.05)
    second = subprocess.Popen(["sleep", "30"])
    try:
        assert procs.start_time(first.pid) is not None and procs.start_time(second.pid) is not None
        assert procs.start_time(first.pid) <= procs.start_time(second.pid)  # type: ignore[operator]
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def sleeper(*args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A process that waits, with `args` on its command line."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *args], cwd=cwd)


def test_processes_naming_a_path(tmp_path: Path) -> None:
    run = tmp_path / "run dir"
    run.mkdir()
    by_arg = sleeper(f"path={run}/agent0.sock,server=on")
    exact = sleeper(str(run))
    inside = sleeper(cwd=run)
    other = sleeper(f"{run}-other")
    try:
        time.sleep(0.1)
        assert set(procs.naming(run)) == {by_arg.pid, exact.pid}
        assert set(procs.naming(run, by_cwd=True)) == {by_arg.pid, exact.pid, inside.pid}
        assert procs.names(by_arg.pid, run) and not procs.names(other.pid, run)
    finally:
        for p in (by_arg, exact, inside, other):
            p.kill()
            p.wait()
    assert procs.naming(run) == []


def test_a_process_in_another_mount_namespace_does_not_see_our_files() -> None:
    assert procs.sees_files_as_we_do(os.getpid())
    with subprocess.Popen(["sleep", "30"]) as same:
        assert procs.sees_files_as_we_do(same.pid)
        same.kill()
    assert not procs.sees_files_as_we_do(same.pid)  # ended: cannot be told
    if os.geteuid() != 0:
        pytest.skip("a new mount namespace needs root (unshare -m)")
    with subprocess.Popen(["unshare", "-m", "sleep", "30"]) as other:
        deadline = time.monotonic() + 10
        while procs.argv(other.pid)[:1] != [b"sleep"]:  # unshare has exec'd sleep in its namespace
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not procs.sees_files_as_we_do(other.pid)
        other.kill()
