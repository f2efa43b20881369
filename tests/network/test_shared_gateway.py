"""One egress gateway process per data dir, serving many sandboxes: each by its own sockets, with its
own policy and audit; the control socket is its owner's only; concurrent starts spawn one process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.network import launcher
from agentkernel.network.policy import EgressRules
from agentkernel.service import audit
from tests.conftest import HOST_PAGE

LOOPBACK = EgressRules(allow=("127.0.0.1",))  # the host server may be reached
DEFAULT = EgressRules()  # host-local destinations refused


def host_processes() -> list[int]:
    """The gateway processes serving this data dir (found by their environment)."""
    home = b"AGENTKERNEL_HOME=" + os.fsencode(os.environ["AGENTKERNEL_HOME"])
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ours = entry.name.isdigit() and b"agentkernel.network.host" in (entry / "cmdline").read_bytes()
            if ours and home in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def gateway_home(isolated_home: Path) -> Iterator[Path]:
    """An isolated data dir; whatever gateway process a test left is killed."""
    yield isolated_home
    for pid in host_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    shutil.rmtree(launcher.gateway_dir())


def rundir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir(mode=0o700)
    return path


def fetch(sock: Path, port: int, extra: str = "") -> bytes:
    """A proxied GET of the host server through a sandbox's socket, as its VMM would forward it."""
    head = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def decisions(sandbox: str) -> list[tuple[str | None, bool]]:
    return [(e["host"], e["allowed"]) for e in audit.entries(sandbox) if e["event"] == "network"]


def test_two_sandboxes_share_one_process_each_with_its_own_policy_and_audit(
    gateway_home: Path, tmp_path: Path, host_server: int
) -> None:
    a, b = rundir(tmp_path, "a"), rundir(tmp_path, "b")
    launcher.start("sb-a", LOOPBACK, a)
    launcher.start("sb-b", DEFAULT, b)
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["sb-a", "sb-b"]
    assert host_processes() == [status["pid"]]
    assert HOST_PAGE.encode() in fetch(launcher.socket_path(a), host_server)
    assert b"403 Forbidden" in fetch(launcher.socket_path(b), host_server)
    assert decisions("sb-a") == [("127.0.0.1", True)]
    assert decisions("sb-b") == [("127.0.0.1", False)]


def test_identity_is_the_socket_never_what_the_guest_sends(
    gateway_home: Path, tmp_path: Path, host_server: int
) -> None:
    """Whatever a request through B's socket claims (another sandbox's name in any header, a command
    id), B's policy judges it and the audit names B; A's sockets are in A's run directory only."""
    a, b = rundir(tmp_path, "a"), rundir(tmp_path, "b")
    launcher.start("sb-a", LOOPBACK, a)
    launcher.start("sb-b", DEFAULT, b)
    claims = "X-Agentkernel-Sandbox: sb-a\r\nProxy-Authorization: Basic c2ItYTphZ2VudGtlcm5lbA==\r\n"
    assert b"403 Forbidden" in fetch(launcher.socket_path(b), host_server, claims)
    assert decisions("sb-a") == []
    assert decisions("sb-b") == [("127.0.0.1", False)]
    for directory in (a, b):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {p.name for p in directory.iterdir()} == {"gateway.sock", "dns.sock"}


def test_withdrawn_sandbox_loses_its_sockets_and_the_last_one_ends_the_process(
    gateway_home: Path, tmp_path: Path, host_server: int
) -> None:
    a, b = rundir(tmp_path, "a"), rundir(tmp_path, "b")
    launcher.start("sb-a", LOOPBACK, a)
    launcher.start("sb-b", LOOPBACK, b)
    pid = host_processes()[0]
    launcher.stop("sb-a", a)
    assert not launcher.socket_path(a).exists()
    assert HOST_PAGE.encode() in fetch(launcher.socket_path(b), host_server)  # B is still served
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["sb-b"]
    launcher.stop("sb-b", b)
    assert wait_gone(pid)
    assert launcher.status() is None and not launcher.control_path().exists()
    launcher.start("sb-a", LOOPBACK, a)  # the next start spawns a new one
    assert HOST_PAGE.encode() in fetch(launcher.socket_path(a), host_server)


def test_sandbox_whose_run_directory_is_removed_is_withdrawn(gateway_home: Path, tmp_path: Path) -> None:
    """A run directory removed without a stop (`doctor` cleaning up after a lost VMM) leaves nothing
    registered."""
    a, b = rundir(tmp_path, "a"), rundir(tmp_path, "b")
    launcher.start("sb-a", DEFAULT, a)
    launcher.start("sb-b", DEFAULT, b)
    shutil.rmtree(a)
    deadline = time.monotonic() + 10
    while (status := launcher.status()) is not None and status["sandboxes"] != ["sb-b"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status is not None and status["sandboxes"] == ["sb-b"]


def test_twenty_five_sandboxes_on_one_process(gateway_home: Path, tmp_path: Path, host_server: int) -> None:
    dirs = [rundir(tmp_path, f"r{i}") for i in range(25)]
    for i, directory in enumerate(dirs):
        launcher.start(f"sb-{i}", LOOPBACK if i % 2 else DEFAULT, directory)
    status = launcher.status()
    assert status is not None and len(status["sandboxes"]) == 25
    assert host_processes() == [status["pid"]]
    for i, directory in enumerate(dirs):
        reply = fetch(launcher.socket_path(directory), host_server)
        assert (HOST_PAGE.encode() in reply) is bool(i % 2), i
        assert decisions(f"sb-{i}") == [("127.0.0.1", bool(i % 2))]


def test_a_hung_gateway_is_replaced_not_doubled(gateway_home: Path, tmp_path: Path, host_server: int) -> None:
    """A gateway that no longer answers (stopped here) is killed by the start that replaces it."""
    a, b = rundir(tmp_path, "a"), rundir(tmp_path, "b")
    launcher.start("sb-a", LOOPBACK, a)
    [hung] = host_processes()
    os.kill(hung, signal.SIGSTOP)
    launcher.start("sb-b", DEFAULT, b)
    assert wait_gone(hung)
    status = launcher.status()
    assert status is not None and host_processes() == [status["pid"]]
    assert status["sandboxes"] == ["sb-b"]  # sb-a has no record of a running VMM to recover from


def test_concurrent_starts_spawn_one_process(gateway_home: Path, tmp_path: Path) -> None:
    """Four processes start a sandbox each at once, with no gateway running: one gateway serves all."""
    script = (
        "import sys; from pathlib import Path; from agentkernel.network import launcher;"
        "from agentkernel.network.policy import EgressRules;"
        "launcher.start(sys.argv[1], EgressRules(), Path(sys.argv[2]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"sb-{i}", str(rundir(tmp_path, f"r{i}"))])
        for i in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["sb-0", "sb-1", "sb-2", "sb-3"]
    assert host_processes() == [status["pid"]]


def test_control_socket_is_the_owners_only(gateway_home: Path, tmp_path: Path) -> None:
    launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
    control = launcher.control_path()
    assert stat.S_IMODE(control.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    assert stat.S_IMODE(launcher.lock_path().stat().st_mode) == 0o600


ATTEMPT = """
import json, os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect:", exc.strerror); sys.exit()
try:
    s.sendall(json.dumps({"op": "status"}).encode() + b"\\n")
    print("reply:", s.recv(65536).decode() or "none")
except OSError:
    print("reply: none")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_control_socket_refuses_another_user(gateway_home: Path, tmp_path: Path) -> None:
    """Another user cannot connect (modes); with the modes opened wide, the gateway itself still
    answers nothing to a peer of another uid (SO_PEERCRED)."""
    launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
    control = launcher.control_path()

    def attempt() -> str:
        done = subprocess.run([sys.executable, "-c", ATTEMPT, str(control)], capture_output=True, timeout=30)
        return done.stdout.decode().strip()

    assert attempt() == "connect: Permission denied"
    opened = [control, control.parent, control.parent.parent]  # the socket, its 0700 folders
    modes = {p: p.stat().st_mode for p in opened}
    try:
        for path in opened:
            path.chmod(modes[path] | 0o007)
        assert attempt() == "reply: none"
    finally:
        for path in opened:
            path.chmod(stat.S_IMODE(modes[path]))
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["sb-a"]  # the owner is still served


def test_bad_control_messages_get_a_one_line_refusal(gateway_home: Path, tmp_path: Path) -> None:
    launcher.start("sb-a", DEFAULT, rundir(tmp_path, "a"))
    replies = []
    for line in (b"not json\n", b"[1]\n", b'{"op": "nope"}\n', b'{"op": "register", "sandbox": 1}\n'):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(launcher.control_path()))
            s.sendall(line)
            replies.append(json.loads(s.makefile("rb").readline()))
    assert [r["ok"] for r in replies] == [False] * 4
    assert all(isinstance(r["error"], str) and "\n" not in r["error"] for r in replies)
    status = launcher.status()
    assert status is not None and status["sandboxes"] == ["sb-a"]
