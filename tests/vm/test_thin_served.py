"""`stop` and `rm` on the thin path (`cli/thin_served.py`) with a real pool daemon and real VMs: the
daemon's service does the work, and the command prints, fails and exits as the full one does, without
the full CLI's imports; without a daemon, or for what it may not take, the full command line runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.cli import thin
from agentkernel.pool import thin_commands, wire
from agentkernel.service import audit, sandboxes
from tests.conftest import cli, either_cli, heavy_imports

pytestmark = pytest.mark.vm


def ok(*args: str) -> str:
    result = cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def status(name: str) -> str | None:
    rows = [s for s in json.loads(ok("list", "--all", "--json")) if s["name"] == name]
    return rows[0]["status"] if rows else None


def thin_and_full(make: list[list[str]], args: list[str], trace: Path) -> None:
    """`args` run thin, then full, each on the state `make` leaves: the same outcome, byte for byte,
    and the thin one without the full CLI's imports."""
    outcomes = []
    for full in (False, True):
        for step in make:
            ok(*step)
        result = either_cli(*args, full=full, trace=None if full else trace)
        outcomes.append((result.returncode, result.stdout, result.stderr))
    assert outcomes[0] == outcomes[1], args
    assert trace.exists(), f"{args} fell back to the full command line"
    assert heavy_imports(trace) == []
    trace.unlink()


@pytest.fixture
def daemon(cli_home: Path) -> Iterator[Path]:
    ok("daemon", "start", "--image", "base", "--size", "1")  # not waited for: only its service is used
    yield cli_home
    cli("daemon", "stop", timeout=120)


def test_stop_and_rm_are_done_by_the_daemon_as_the_full_ones_do_them(daemon: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    create = ["create", "--backend", "qemu", "--no-network", "box"]
    ok(*create)
    ok("start", "box")
    result = either_cli("stop", "box", trace=trace)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"box\n", b"")
    assert heavy_imports(trace) == [] and status("box") == "stopped"
    assert [e["event"] for e in audit.entries("box")][-1] == "stop"
    ok("start", "box")
    thin_and_full([], ["rm", "box"], trace)  # running: refused alike, nothing removed
    assert status("box") == "running"
    result = either_cli("rm", "--force", "box", trace=trace)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"box\n", b"")
    assert status("box") is None and not (daemon / "sandboxes" / "box").exists()
    thin_and_full([], ["stop", "absent"], trace)
    thin_and_full([], ["rm", "absent"], trace)
    thin_and_full([create], ["rm", "box", "absent", "box"], trace)  # the first done, then the error
    thin_and_full([create, [*create[:-1], "two"]], ["rm", "-f", "two", "box"], trace)
    assert status("box") is None and status("two") is None


def test_what_the_thin_path_does_not_take_goes_to_the_full_command_line(daemon: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    for args in (["stop", "a", "b"], ["rm", "Bad!name"], ["rm", "--help"], ["stop"], ["rm", "-ff", "x"]):
        full = either_cli(*args, full=True)
        result = either_cli(*args, trace=trace)
        assert (result.returncode, result.stdout, result.stderr) == (
            full.returncode,
            full.stdout,
            full.stderr,
        )
        assert not trace.exists(), args
    cli("daemon", "stop", timeout=120)
    ok("create", "--backend", "qemu", "--no-network", "box")
    result = either_cli("rm", "box", trace=trace)  # no daemon: the full command does it
    assert (result.returncode, result.stdout) == (0, b"box\n")
    assert not trace.exists() and status("box") is None


def daemon_files(under: Path) -> list[str]:
    """The files under `under` the daemon has open."""
    fds = Path(f"/proc/{int(wire.pid_file().read_text())}/fd")
    return [target for fd in fds.iterdir() if (target := os.readlink(fd)).startswith(str(under))]


def test_a_client_that_leaves_cancels_what_it_asked(daemon: Path, tmp_path: Path) -> None:
    """As the full command, killed or interrupted, does no more: the daemon's work for it stops."""
    ok("create", "--backend", "qemu", "--no-network", "box")
    ok("start", "box")
    env = {k: v for k, v in os.environ.items() if k != thin.FULL_ENV}
    argv = [sys.executable, "-m", "agentkernel", "stop", "box"]
    with sandboxes.locked("box"):  # the daemon's stop waits for the lock: the client is waiting
        client = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)
        client.send_signal(signal.SIGKILL)
        assert client.wait() == -signal.SIGKILL
    time.sleep(3)
    assert status("box") == "running" and "stop" not in [e["event"] for e in audit.entries("box")]
    ok("exec", "box", "--", "sh", "-c", "dd if=/dev/zero of=/root/big bs=1M count=150 2>/dev/null")
    dest = tmp_path / "dest"
    dest.mkdir()
    argv = [sys.executable, "-m", "agentkernel", "cp", "box:/root/big", str(dest)]
    client = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not [p for p in dest.iterdir() if p.name.startswith(".big.")]:  # the copy is under way
        assert time.monotonic() < deadline and client.poll() is None, client.communicate()
        time.sleep(0.05)
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 130
    assert list(dest.iterdir()) == []  # its part file went with it
    deadline = time.monotonic() + 30
    while daemon_files(dest):  # the daemon let go of the client's file
        assert time.monotonic() < deadline, f"the daemon still has {daemon_files(dest)} open"
        time.sleep(0.2)
    ok("rm", "-f", "box")


def test_malformed_requests_are_refused_and_do_nothing(daemon: Path) -> None:
    ok("create", "--backend", "qemu", "--no-network", "box")
    for message in (
        {"op": "remove_sandboxes", "names": "box"},
        {"op": "remove_sandboxes", "names": []},
        {"op": "remove_sandboxes", "names": ["box", "../x"]},
        {"op": "remove_sandboxes", "names": ["box"], "force": "yes"},
        {"op": "remove_sandboxes", "names": ["box"] * 257},
        {"op": "stop_sandbox", "names": ["box", "box"]},
        {"op": "stop_sandbox", "names": ["box"], "force": True},
    ):
        reply = wire.request(message)
        assert reply.get("refused") and "done" not in reply, message
    assert status("box") == "stopped"
    reply = wire.request({"op": "remove_sandboxes", "names": ["box"]})
    assert reply == {"ok": True, "done": ["box"]} and status("box") is None


def cp(*args: str, cwd: Path, full: bool = False, trace: Path | None = None) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if k not in (thin.FULL_ENV, thin.TRACE_ENV)}
    env.update({thin.FULL_ENV: "1"} if full else {thin.TRACE_ENV: str(trace)} if trace else {})
    argv = [sys.executable, "-m", "agentkernel", "cp", *args]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_cp_is_done_by_the_daemon_in_the_callers_directory(daemon: Path, tmp_path: Path) -> None:
    trace, work = tmp_path / "trace", tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "f.txt").write_bytes(b"hello\n" * 100_000)
    (work / "sub" / "f.txt").chmod(0o640)
    ok("create", "--backend", "qemu", "--no-network", "box")
    ok("start", "box")

    def thin_ok(*args: str) -> None:
        assert cp(*args, cwd=work, trace=trace) == (0, b"", b""), args
        assert heavy_imports(trace) == [], args
        trace.unlink()

    thin_ok("sub/f.txt", "box:/root/")  # into a directory: the source's name
    thin_ok("sub/f.txt", "box:/tmp")  # a directory without the slash: the same
    thin_ok("sub/f.txt", "box:/root/g.txt")
    listing = ok("exec", "box", "--", "sh", "-c", "stat -c '%n %a %s' /root/f.txt /tmp/f.txt /root/g.txt")
    assert listing.split("\n")[:3] == [
        f"{p} 640 600000" for p in ("/root/f.txt", "/tmp/f.txt", "/root/g.txt")
    ]
    thin_ok("box:/root/g.txt", "sub")  # into a local directory
    thin_ok("box:/root/g.txt", "back.txt")
    for copied in (work / "sub" / "g.txt", work / "back.txt"):
        assert copied.read_bytes() == b"hello\n" * 100_000 and copied.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in work.iterdir()) == ["back.txt", "sub"]  # no .part left

    for args in (
        ("box:/root/absent", "x"),
        ("box:/root", "x"),  # a directory: not a regular file
        ("box:/", "sub"),  # names no file
        ("absent.txt", "box:/root/"),
        ("sub", "box:/root/"),  # a local directory: not a file
        ("sub/f.txt", "absent-box:/root/"),
        ("box:/root/g.txt", "sub/f.txt/x"),  # cannot write: its directory is a file
    ):
        outcome = cp(*args, cwd=work, trace=trace)
        assert outcome == cp(*args, cwd=work, full=True), args
        assert outcome[0] == 1 and outcome[2].startswith(b"agentkernel: error: "), (args, outcome)
        assert trace.exists(), f"{args} fell back to the full command line"
        trace.unlink()
    assert sorted(p.name for p in (work / "sub").iterdir()) == ["f.txt", "g.txt"]


def test_cp_copies_the_file_the_caller_sees(daemon: Path, tmp_path: Path) -> None:
    """The caller opens its host file, not the daemon: a file only the caller's mount namespace has
    is the one copied."""
    if os.geteuid() != 0:
        pytest.skip("a new mount namespace needs root (unshare -m)")
    trace, private = tmp_path / "trace", tmp_path / "private"
    private.mkdir()
    (private / "f.txt").write_text("the daemon's view\n")
    ok("create", "--backend", "qemu", "--no-network", "box")
    ok("start", "box")
    env = {k: v for k, v in os.environ.items() if k != thin.FULL_ENV}
    env[thin.TRACE_ENV] = str(trace)
    agentkernel = f"{sys.executable} -m agentkernel"
    cp = f"{agentkernel} cp f.txt box:/root/ && {agentkernel} cp box:/root/f.txt back.txt"
    script = f"mount -t tmpfs none {private} && cd {private} && echo mine > f.txt && {cp} && cat back.txt"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, timeout=300)
    assert (result.returncode, result.stdout) == (0, b"mine\n"), result.stderr.decode()
    assert trace.exists()  # done by the daemon, with the caller's files
    assert ok("exec", "box", "--", "cat", "/root/f.txt") == "mine\n"
    assert sorted(p.name for p in private.iterdir()) == ["f.txt"]  # nothing written on the daemon's side


def exchange(message: dict[str, object], *fds: int) -> dict[str, object]:
    """The daemon's reply to `message`, `fds` sent when it asks for the host file (closed here)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(wire.socket_path()))
        sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as lines:
            reply = json.loads(lines.readline())
            if reply == wire.SEND_FD:
                socket.send_fds(sock, [b"\0"], list(fds))
                reply = json.loads(lines.readline())
    for fd in fds:
        os.close(fd)
    return reply


def test_a_copy_takes_only_an_open_regular_file_of_the_right_mode(daemon: Path, tmp_path: Path) -> None:
    ok("create", "--backend", "qemu", "--no-network", "box")
    ok("start", "box")
    ok("exec", "box", "--", "sh", "-c", "echo guest > /root/g")
    work = tmp_path / "work"
    work.mkdir()
    (work / "f").write_text("x")
    download = {"op": "copy_file", "sandbox": "box", "remote": "/root/g", "upload": False}
    upload = {"op": "copy_file", "sandbox": "box", "remote": "/root/up", "upload": True, "local_name": "f"}
    for message, fd in (
        (download, os.open(work / "f", os.O_RDONLY)),  # read-only: the daemon may not write it
        (upload, os.open(work / "f", os.O_WRONLY)),
        (upload, os.open(work / "f", os.O_PATH)),  # names the file, gives no right to read it
        (upload, os.open(work, os.O_RDONLY)),  # a directory
    ):
        assert exchange(message, fd) == thin_commands.REFUSED, message
    for message in (
        {**upload, "local_name": None},
        {**download, "sandbox": "../x"},
        {**download, "upload": 1},
    ):
        assert exchange(message) == thin_commands.REFUSED, message  # refused before a file is asked for
    assert exchange(upload) == {"ok": False, "error": "the client left"}  # asked, and sent none
    assert (work / "f").read_text() == "x"
    assert cli("exec", "box", "--", "test", "-e", "/root/up").returncode == 1
    # Several files sent: the first is the one; the others are never the daemon's.
    sent = [
        os.open(work / "f", os.O_RDONLY),
        os.open(work, os.O_RDONLY),
        os.open(work / "f", os.O_RDONLY),
    ]
    assert exchange(upload, *sent) == {"ok": True, "done": []}
    assert ok("exec", "box", "--", "cat", "/root/up") == "x"
    assert daemon_files(work) == []
