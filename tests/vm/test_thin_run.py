"""`run` on the thin path (`cli/thin_run.py`) with a real pool daemon and real VMs: the command runs
in a leased pooled sandbox without the full CLI's imports, prints and exits as the full `run` does,
and nothing it leased outlives it: removed when it ends, when it is interrupted, and when it is
killed outright (by the daemon's reaper)."""

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
from typing import Any

import pytest

from agentkernel.cli import thin
from agentkernel.pool import wire
from tests.conftest import cli, either_cli, heavy_imports

pytestmark = pytest.mark.vm


def ok(*args: str) -> str:
    result = cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def ready() -> list[str]:
    return [entry["name"] for entry in json.loads(ok("daemon", "status", "--json"))["pools"][0]["ready"]]


def every_name() -> set[str]:
    return {s["name"] for s in json.loads(ok("list", "--all", "--json"))}


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def run(*args: str, full: bool = False, trace: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return either_cli("run", *args, full=full, trace=trace)


def thin_done(trace: Path) -> bool:
    if not trace.exists():
        return False
    assert heavy_imports(trace) == []
    trace.unlink()
    return True


def sleeping_run(trace: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A `run` whose command sleeps, once its command runs; and its sandbox's name."""
    env = {**os.environ, **({thin.TRACE_ENV: str(trace)} if trace is not None else {})}
    argv = [sys.executable, "-m", "agentkernel", "run", "--", "sh", "-c", "echo $(hostname); exec sleep 60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


@pytest.fixture
def pool(cli_home: Path) -> Iterator[Path]:
    ok("daemon", "start", "--image", "base", "--size", "2", "--wait")
    yield cli_home
    cli("daemon", "stop", timeout=120)


def test_a_pooled_run_is_thin_and_as_the_full_one(pool: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    pooled = set(ready())
    for args in (
        ("--", "sh", "-c", "echo out; echo err >&2; exit 5"),
        ("-e", "A=b", "--workdir=/tmp", "--image", "base", "--", "sh", "-c", 'echo "$A $(pwd)"'),
        ("--backend", "qemu", "--no-network", "--", "true"),  # another kind: the full `run` boots one
        ("--", "nosuchcommand"),
        ("--timeout", "1", "--", "sleep", "5"),
    ):
        fast = run(*args, trace=trace)
        done_thin = thin_done(trace)
        wait_for(lambda: len(ready()) == 2, "the pool to refill")
        full = run(*args, full=True)
        assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr), (
            args
        )
        assert done_thin == ("--no-network" not in args), args
        wait_for(lambda: len(ready()) == 2, "the pool to refill")
    hostname = run("--", "hostname", trace=trace)
    name = hostname.stdout.decode().strip()
    assert thin_done(trace) and name in every_name() | pooled | {name} and name.startswith("run-")
    assert name not in every_name()  # removed before `run` returned
    audit = [json.loads(line) for line in (pool / "audit.jsonl").read_text().splitlines()]
    events = [e["event"] for e in audit if e.get("sandbox") == name]
    assert events[-3:] == ["pool_acquire", "exec", "remove"]


def test_what_the_pool_cannot_serve_goes_to_the_full_run(pool: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    for args in (
        ("--keep", "--", "true"),
        ("--name", "mine", "--", "true"),
        ("--no-pool", "--", "true"),
        ("-p", "8000", "--", "true"),
        ("--memory", "256", "--", "true"),
        ("--lifetime", "60", "--", "true"),
        ("--vcpus", "x", "--", "true"),
    ):
        result = run(*args, trace=trace)
        assert not thin_done(trace), args
        assert result.returncode in (0, 2), (args, result.stderr)
    if os.geteuid() == 0:  # a caller in another mount namespace: its directory is not the daemon's
        env = {k: v for k, v in os.environ.items() if k != thin.FULL_ENV}
        argv = ["unshare", "-m", sys.executable, "-m", "agentkernel", "run", "--", "echo", "hi"]
        result = subprocess.run(
            argv, env={**env, thin.TRACE_ENV: str(trace)}, capture_output=True, timeout=300
        )
        assert (result.returncode, result.stdout) == (0, b"hi\n"), result.stderr
        assert not trace.exists()
    cli("rm", "-f", "mine")
    for name in every_name() - set(ready()):
        cli("rm", "-f", name)


def test_a_signal_reaches_the_command_and_the_sandbox_goes(pool: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    proc, name = sleeping_run(trace)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert thin_done(trace) and name not in every_name()


def test_a_killed_thin_run_leaves_nothing(pool: Path) -> None:
    proc, name = sleeping_run()
    assert name in every_name()
    proc.kill()
    proc.wait()
    wait_for(lambda: name not in every_name(), "the reaper to remove the killed run's sandbox", timeout=60)


def request_as_other_process(message: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(wire.socket_path()))
        sock.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(sock.makefile().readline())


def test_leases_and_releases_are_checked(pool: Path, tmp_path: Path) -> None:
    bad = (
        {"op": "lease", "cwd": "relative", "command": ["true"], "flags": {}},
        {"op": "lease", "cwd": str(tmp_path), "command": [], "flags": {}},
        {"op": "lease", "cwd": str(tmp_path), "command": ["true"], "flags": {"vcpus": True}},
        {"op": "lease", "cwd": str(tmp_path), "command": ["true"], "flags": {"mount_cwd": True}},
        {"op": "release", "sandbox": 7},
    )
    for message in bad:
        reply = request_as_other_process(message)
        assert reply["ok"] is False and reply["error"], message
    # A sandbox another process leased is not this one's to remove.
    proc, name = sleeping_run()
    reply = request_as_other_process({"op": "release", "sandbox": name})
    assert reply == {"ok": False, "error": f"sandbox '{name}' is not the asking process's"}
    assert name in every_name()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert name not in every_name()
