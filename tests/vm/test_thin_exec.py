"""`exec` on the thin path (`cli/thin_exec.py`) in a real VM, against the full command line: the same
stdout, stderr and exit code for every outcome, done without the full CLI's imports, audited alike;
what it does not take goes to the full CLI unchanged."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.cli import thin
from agentkernel.sandbox import db
from tests.conftest import cli, either_cli, heavy_imports

pytestmark = pytest.mark.vm


def run(*args: str, full: bool = False, trace: Path | None = None, input: bytes | None = None):
    return either_cli("exec", *args, full=full, trace=trace, input=input, timeout=120)


def both(
    tmp_path: Path, *args: str, input: bytes | None = None
) -> tuple[subprocess.CompletedProcess[bytes], bool]:
    """`exec ARGS` thin and full; assert they agree (command ids aside); the thin result and whether
    the thin path ran it (then without the heavy imports)."""
    trace = tmp_path / "trace"
    trace.unlink(missing_ok=True)
    fast = run(*args, trace=trace, input=input)
    full = run(*args, full=True, input=input)
    assert (fast.returncode, ids(fast.stdout), fast.stderr) == (
        full.returncode,
        ids(full.stdout),
        full.stderr,
    ), args
    if not trace.exists():
        return fast, False
    assert heavy_imports(trace) == [], args
    return fast, True


def ids(out: bytes) -> bytes:
    return re.sub(rb"c-[0-9a-f]{8}", b"c-ID", out)


@pytest.fixture
def box(cli_home: Path) -> str:
    assert cli("create", "thinx").returncode == 0
    assert cli("start", "thinx").returncode == 0
    return "thinx"


def test_every_outcome_matches_the_full_cli(box: str, tmp_path: Path) -> None:
    cases: list[tuple[str, ...]] = [
        ("sh", "-c", "echo out; echo err >&2; exit 3"),
        ("sh", "-c", "kill -9 $$"),
        ("nosuchcommand",),
        ("-w", "/nonexistent", "pwd"),
        ("-w", "/tmp", "pwd"),
        ("--workdir=/etc", "pwd"),
        ("-e", "FOO=bar", "--env=BAZ=q u x", "sh", "-c", 'echo "$FOO $BAZ"'),
        ("--timeout", "1", "sleep", "5"),
        ("sh", "-c", "env | sort"),  # the sandbox's own variables and the network's, per command
    ]
    for case in cases:
        assert both(tmp_path, box, "--", *case)[1], case
    assert both(tmp_path, box, "--", "sh", "-c", "exit 3")[0].returncode == 3
    env = both(tmp_path, box, "--", "env")[0].stdout.decode()
    assert "HTTP_PROXY=" in env and "c-ID" in ids(env.encode()).decode()  # the command's own id


def test_the_thin_exec_is_audited_like_the_full_one(box: str, tmp_path: Path, cli_home: Path) -> None:
    result, done_thin = both(tmp_path, box, "--", "sh", "-c", "exit 7")
    assert done_thin and result.returncode == 7
    entries = [json.loads(line) for line in (cli_home / "audit.jsonl").read_text().splitlines()]
    execs = [e for e in entries if e["event"] == "exec" and e["argv"] == ["sh", "-c", "exit 7"]]
    assert len(execs) == 2
    assert (
        {k: execs[0][k] for k in ("sandbox", "exit_code", "signal", "timed_out")}
        == {k: execs[1][k] for k in ("sandbox", "exit_code", "signal", "timed_out")}
        == {"sandbox": box, "exit_code": 7, "signal": None, "timed_out": False}
    )
    assert re.fullmatch(r"c-[0-9a-f]{8}", execs[0]["command"]) and execs[0]["command"] != execs[1]["command"]
    assert set(execs[0]) == set(execs[1])


def test_stdin_and_output_beyond_the_windows(box: str, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    result, done_thin = both(tmp_path, "-i", box, "--", "sh", "-c", "cat; echo done >&2", input=data)
    assert done_thin and result.stdout == data and result.stderr == b"done\n"
    result, done_thin = both(tmp_path, box, "--", "head", "-c", "5000000", "/dev/zero")
    assert done_thin and len(result.stdout) == 5_000_000


def test_what_it_does_not_take_goes_to_the_full_cli(box: str, tmp_path: Path) -> None:
    for args in (
        ("-t", box, "--", "true"),
        ("--help",),
        ("absent", "--", "true"),
        ("bad/name", "--", "true"),
        ("-e", "NOEQUALS", box, "--", "true"),
        ("--timeout", "nan", box, "--", "true"),
        (box,),
    ):
        _, done_thin = both(tmp_path, *args)
        assert not done_thin, args
    trace = tmp_path / "trace"
    trace.unlink(missing_ok=True)
    detached = run("-d", box, "--", "true", trace=trace)
    assert detached.returncode == 0 and detached.stdout.strip().isdigit() and not trace.exists()
    assert cli("stop", box).returncode == 0
    result, done_thin = both(tmp_path, box, "--", "true")
    assert not done_thin and b"not running" in result.stderr


def test_busy_agent_ports_go_to_the_full_cli(box: str, tmp_path: Path) -> None:
    row = db.row(box)
    assert row is not None
    rundir = Path(row["rundir"])
    held = []
    for port in range(4):
        f = paths.open_private(rundir / f"agent{port}.lock", "w")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(f)
    trace = tmp_path / "trace"
    start = time.monotonic()
    result = run(box, "--", "true", trace=trace)
    assert not trace.exists()  # handed to the full CLI, which waits for a port and says why not
    assert result.returncode == 1 and b"busy" in result.stderr and time.monotonic() - start > 20
    for f in held:
        f.close()


def test_signals_reach_the_command_and_a_second_stops_the_waiting(box: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    env = {**os.environ, thin.TRACE_ENV: str(trace)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "exec", box, "--", "sh", "-c", "echo ready; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130  # sleep ended by the SIGINT, as a shell reports it
    assert trace.exists()

    script = "trap '' INT; echo ready; while :; do sleep 1; done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "exec", box, "--", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr is not None
    assert proc.stderr.read().decode().strip() == (
        "agentkernel: error: stopped waiting for the command after a second SIGINT; "
        "it may still run in the sandbox"
    )


def test_a_vm_that_dies_under_a_thin_exec_says_so(box: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "exec", box, "--", "sh", "-c", "echo ready; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, thin.TRACE_ENV: str(trace)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    record = json.loads(cli("list", "--json").stdout)[0]
    os.kill(record["pid"], signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert err.startswith(f"agentkernel: error: sandbox '{box}' failed") and err.count("\n") == 1, err
    assert trace.exists()
