"""`attach` on a real pseudo-terminal: a shell that follows the terminal's size, and its exit code."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.vm


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"did not see {needle!r} in {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child side closed
                break
            if not chunk:
                break
            seen += chunk
    assert needle in seen, seen[-500:]
    return seen


def test_attach_shell_follows_terminal_size(cli_home: Path) -> None:
    assert cli("create", "tty").returncode == 0
    assert cli("start", "tty").returncode == 0
    master, slave = os.openpty()
    set_size(slave, 40, 100)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "attach", "tty"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        env=os.environ.copy(),
    )
    os.close(slave)
    try:
        banner = read_until(master, b"# ")
        if b"\x1b[6n" in banner:  # the shell asks where the cursor is, as a terminal would be asked
            os.write(master, b"\x1b[1;1R")
        os.write(master, b"stty size; tty\r")
        out = read_until(master, b"/dev/pts/")
        assert b"40 100" in out
        set_size(master, 50, 120)
        os.kill(proc.pid, signal.SIGWINCH)
        time.sleep(0.5)
        os.write(master, b"stty size\r")
        read_until(master, b"50 120")
        os.write(master, b"exit 3\r")
        assert proc.wait(timeout=30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def run_on_terminal(*args: str) -> bytes:
    """Run the CLI with its stdin, stdout and stderr on a pseudo-terminal; what it printed."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", *args], stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal's last user went away
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=60)
    os.close(master)
    return output


def test_software_emulation_is_said_once(cli_home: Path) -> None:
    from agentkernel import hostinfo

    if hostinfo.accel().name != "tcg":
        pytest.skip("this host has KVM: there is no emulation to tell about")
    first = run_on_terminal("run", "--", "echo", "hi")
    second = run_on_terminal("run", "--", "echo", "hi")
    assert b"run under emulation" in first and b"run under emulation" not in second
    assert b"hi" in first and b"hi" in second


ATTACH_RUNS = 20
TYPED = b"first line\nsecond line, typed without its newline"


def attach_cat(base: str, sandbox: str, *, tty: bool) -> tuple[bytes, dict[str, object]]:
    """Attach `cat` over the API's WebSocket, send TYPED and the eof control at once; its output and
    its exit message."""
    from websockets.sync.client import connect

    url = f"{base}/sandboxes/{sandbox}/attach?command=cat&tty={str(tty).lower()}"
    output = b""
    with connect(url, max_size=None) as ws:
        ws.send(TYPED)
        ws.send(json.dumps({"type": "eof"}))
        while True:
            message = ws.recv(timeout=60)  # a lost EOF leaves cat waiting: fail, do not hang
            if isinstance(message, bytes):
                output += message
            else:
                return output, json.loads(message)


def test_websocket_data_then_eof_always_reaches_cat(cli_home: Path, tmp_path: Path) -> None:
    """Data, then EOF, in one go: `cat` gets all of it and ends with 0, on pipes and on a terminal.
    On a terminal the data ends in a partial line: one EOF character only passes that line on."""
    from agentkernel.client.sync import Client
    from tests.api.server import api_server

    with api_server(tmp_path) as url, Client(url) as ak, ak.create_sandbox(image="base") as box:
        base = url.replace("http://", "ws://")
        for run in range(ATTACH_RUNS):
            output, exit_message = attach_cat(base, box.name, tty=False)
            assert (output, exit_message["exit_code"]) == (TYPED, 0), (run, output, exit_message)
            output, exit_message = attach_cat(base, box.name, tty=True)
            assert exit_message["exit_code"] == 0, (run, output, exit_message)
            # The terminal echoes each line, and cat writes it back: each arrives twice, as CRLF.
            assert output.count(b"first line\r\n") == 2, (run, output)
            assert output.count(b"second line, typed without its newline") == 2, (run, output)
