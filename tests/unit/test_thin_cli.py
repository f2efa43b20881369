"""The thin command line (`cli/thin.py`) against the full one: the same stdout, stderr and exit code on
every input, the real CLI in subprocesses on a real state database; commands it does itself import
neither Typer, rich, pydantic nor asyncio, and whatever needs the service's work goes to the full CLI.

A running sandbox's VMM is stood in for by a process whose command line names the run directory's
QEMU pidfile (what the QEMU backend's liveness check reads in /proc); tests/vm/test_thin_cli.py does
the same against real VMs.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agentkernel.cli import thin
from agentkernel.config import PROFILES
from agentkernel.sandbox import state
from agentkernel.sandbox.liveness import QEMU_PIDFILE
from agentkernel.sandbox.state import SandboxRecord
from tests.conftest import either_cli, heavy_imports


def run_cli(
    home: Path, *args: str, full: bool = False, trace: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return either_cli(*args, full=full, trace=trace, env={"AGENTKERNEL_HOME": str(home)}, timeout=120)


def outcome(result: subprocess.CompletedProcess[bytes]) -> tuple[int, bytes, bytes]:
    return result.returncode, result.stdout, result.stderr


def record(name: str, **changes: object) -> SandboxRecord:
    base = SandboxRecord(
        name=name, backend="qemu", image="base", image_digest="sha256:ab", vcpus=1, memory_mb=512,
        profile="moderate", status="stopped", pid=None, rundir=f"/nonexistent/run/{name}",
        created_at=f"2026-01-01T00:00:0{len(name) % 10}Z",
        policy=replace(PROFILES["moderate"], network=False),
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A live process standing in for a QEMU VMM: its command line names rundir/qemu.pid."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", str(rundir / QEMU_PIDFILE)]
    )
    yield proc.pid, rundir
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def same_both_ways(home: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[bytes], bool]:
    """Run `args` thin and full on the same (unchanged) state; assert they agree; the thin result and
    whether the thin path did it itself."""
    trace = tmp_path / "trace"
    trace.unlink(missing_ok=True)
    fast = run_cli(home, *args, trace=trace)
    full = run_cli(home, *args, full=True)
    assert outcome(fast) == outcome(full), args
    return fast, trace.exists()


def test_empty_and_version_are_done_thin_without_heavy_imports(isolated_home: Path, tmp_path: Path) -> None:
    for args, expected in ((["ls"], b"no sandboxes\n"), (["--version"], b"agentkernel 0.1.0\n")):
        result, done_thin = same_both_ways(isolated_home, tmp_path, *args)
        assert done_thin, args
        assert (result.returncode, result.stdout) == (0, expected)
        assert heavy_imports(tmp_path / "trace") == []


def test_the_table_matches_the_full_cli(isolated_home: Path, tmp_path: Path, vmm: tuple[int, Path]) -> None:
    pid, rundir = vmm
    state.insert(record("alpha", labels={"team": "a"}))
    state.insert(record("beta-with-a-longer-name", status="created", labels={"team": "b", "x": "1"}))
    state.insert(record("live", status="running", pid=pid, rundir=str(rundir), labels={"team": "a"}))
    state.insert(record("ready", pool="somekey", owner=None))
    cases = [
        ["ls"], ["list"], ["ls", "-a"], ["ls", "--all"],
        ["ls", "--filter", "label=team=a"], ["ls", "-f", "label=team=b", "-a"], ["ls", "--filter=label=x=1"],
        ["ls", "-f", "label=team=nobody"],
    ]  # fmt: skip
    for args in cases:
        result, done_thin = same_both_ways(isolated_home, tmp_path, *args)
        assert done_thin and result.returncode == 0, args
    table = run_cli(isolated_home, "ls").stdout.decode().splitlines()
    assert [line.split()[:2] for line in table[1:]] == [
        ["beta-with-a-longer-name", "created"],
        ["live", "running"],
        ["alpha", "stopped"],
    ]
    assert "ready" in run_cli(isolated_home, "ls", "-a").stdout.decode()


def test_what_it_does_not_understand_goes_to_the_full_cli(isolated_home: Path, tmp_path: Path) -> None:
    state.insert(record("alpha"))
    for args in (
        ["ls", "--json"],  # the public view: pydantic
        ["ls", "--bogus"],  # a usage error, phrased by the full CLI
        ["ls", "--help"],
        ["ls", "--filter", "team=a"],  # an input error, phrased by the full CLI
        ["ls", "-f", "label=bad key=1"],
        ["ls", "-f"],
        ["ls", "extra-argument"],
        ["stop", "no-such-box"],
        ["rm", "bad/name"],
        ["exec", "no-such-box", "--", "true"],
    ):
        result, done_thin = same_both_ways(isolated_home, tmp_path, *args)
        assert not done_thin, args
        if args != ["ls", "--json"] and args != ["ls", "--help"]:
            assert result.returncode != 0 and result.stderr.startswith(b"agentkernel: "), args


@pytest.mark.parametrize("case", ["dead_vmm", "dead_owner", "interrupted_start", "expired"])
def test_records_needing_work_go_to_the_full_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The full CLI reaps and reconciles (and so changes the state): each path runs on a home of its
    own, made alike, and they print the same."""
    results = []
    for path in ("thin", "full"):
        home = tmp_path / path
        monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
        state.insert(record("kept"))
        changes: dict[str, object] = {
            "dead_vmm": {"status": "running", "pid": dead_pid(), "rundir": str(home / "run")},
            "dead_owner": {"owner": {"pid": dead_pid(), "start": 1}},
            "interrupted_start": {"status": "starting", "starter": {"pid": dead_pid(), "start": 1}},
            "expired": {"status": "running", "pid": os.getpid(), "deadline": 1.0, "rundir": str(home / "r")},
        }[case]
        state.insert(record("worked-on", **changes))
        trace = tmp_path / f"trace-{path}"
        results.append(run_cli(home, "ls", full=path == "full", trace=trace))
        assert not trace.exists()  # the thin path handed it over
    assert outcome(results[0]) == outcome(results[1])
    assert results[0].returncode == 0


def test_a_damaged_database_is_the_full_clis_one_line(isolated_home: Path, tmp_path: Path) -> None:
    assert run_cli(isolated_home, "ls").returncode == 0
    (isolated_home / "state.db").write_bytes(b"not a database" * 1000)
    result, done_thin = same_both_ways(isolated_home, tmp_path, "ls")
    assert not done_thin and result.returncode == 1
    assert b"is damaged" in result.stderr and result.stderr.count(b"\n") == 1


@pytest.mark.parametrize(
    "env",
    [
        {"HOME": "/home/u"},
        {"HOME": "/home/u/", "XDG_DATA_HOME": "/data/x"},
        {"HOME": "/", "XDG_DATA_HOME": "/data/x/"},
        {"HOME": "/home/u", "XDG_DATA_HOME": ""},
        {"HOME": "/home/u", "XDG_DATA_HOME": "relative/x"},
        {"HOME": "/home/u", "XDG_DATA_HOME": " /padded"},
        {"HOME": "relative"},
    ],
)
def test_the_data_dir_is_platformdirs_own(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """The data dir worked out without importing platformdirs is the one platformdirs gives."""
    import platformdirs

    from agentkernel import paths

    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        expected = platformdirs.user_data_dir("agentkernel", appauthor=False)
    except RuntimeError:  # no home directory it can use: neither way may answer
        with pytest.raises(RuntimeError):
            paths.user_data_dir()
        return
    assert paths.user_data_dir() == expected


def test_ls_in_the_default_data_dir_skips_platformdirs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTKERNEL_HOME", thin.FULL_ENV)}
    trace = tmp_path / "trace"
    env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "xdg"), **{thin.TRACE_ENV: str(trace)})
    result = subprocess.run(
        [sys.executable, "-m", "agentkernel", "ls"], capture_output=True, env=env, timeout=120
    )
    assert (result.returncode, result.stdout) == (0, b"no sandboxes\n"), result.stderr
    assert (tmp_path / "xdg" / "agentkernel" / "state.db").is_file()
    assert "platformdirs" not in trace.read_text().split()


def test_a_reader_that_left_ends_both_paths_alike(isolated_home: Path) -> None:
    """`ls | head -0`: stdout is a pipe nobody reads; no traceback, the full CLI's exit code."""
    results = []
    for full in (False, True):
        env = {**os.environ, "AGENTKERNEL_HOME": str(isolated_home), thin.FULL_ENV: "1" if full else "0"}
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "agentkernel", "ls"], stdout=write, stderr=subprocess.PIPE, env=env
            )
        finally:
            os.close(write)
        results.append((done.returncode, done.stderr))
    assert results[0] == results[1]
    assert b"Traceback" not in results[0][1]


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("{not json", "stopped"),  # ValueError
        ('{"labels": "a string"}', "stopped"),  # AttributeError
        ('{"deadline": "soon"}', "running"),  # TypeError
        ('{"owner": ["not", "an", "owner"]}', "stopped"),  # AttributeError in the owner check
    ],
)
def test_a_damaged_row_is_the_full_clis_output(
    isolated_home: Path, tmp_path: Path, vmm: tuple[int, Path], extra: str, status: str
) -> None:
    pid, rundir = vmm
    state.insert(record("damaged", status=status, pid=pid, rundir=str(rundir)))
    with sqlite3.connect(isolated_home / "state.db") as db:
        db.execute("UPDATE sandboxes SET extra = ? WHERE name = 'damaged'", (extra,))
    result, done_thin = same_both_ways(isolated_home, tmp_path, "ls")
    assert not done_thin and result.returncode == 1
    assert b"is damaged" in result.stderr and result.stderr.count(b"\n") == 1, result.stderr
