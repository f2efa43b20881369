"""State database errors reach the user as one line naming the file and what to do, never a traceback.

The CLI runs in a subprocess against an isolated AGENTKERNEL_HOME; the lock is held by sqlite3 here.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkernel.errors import StateBusyError
from agentkernel.sandbox import state
from tests.conftest import cli


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentkernel: error: "), err
    return lines[0]


@pytest.fixture
def db(isolated_home: Path) -> Path:
    """A state database as the CLI makes it (its WAL checkpointed away when it exits)."""
    assert cli("list").returncode == 0
    path = isolated_home / "state.db"
    assert path.is_file() and not (isolated_home / "state.db-wal").exists()
    return path


def test_a_busy_database_is_waited_for_and_said_so(db: Path) -> None:
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # in WAL mode readers get past a plain BEGIN EXCLUSIVE
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("SELECT * FROM sandboxes").fetchall()
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        waited = time.monotonic() - start
        assert line.startswith(f"agentkernel: waiting for {db}: another agentkernel process is using it")
        assert waited >= 1.0
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting, not failed
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.decode().strip() == "no sandboxes"


def test_waiting_is_bounded(
    db: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(state, "BUSY_LIMIT", 2.0)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # blocks writers even in WAL mode
    try:
        start = time.monotonic()
        with pytest.raises(StateBusyError) as caught:
            state.update("nobody", status="stopped")
        assert 2.0 <= time.monotonic() - start < 5
    finally:
        holder.close()
    assert str(db) in str(caught.value) and "try again" in str(caught.value)
    assert capfd.readouterr().err.count("waiting for") == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_database_is_one_line(db: Path, damage: str) -> None:
    if damage == "garbage":
        db.write_bytes(os.urandom(64 << 10))
    else:
        with sqlite3.connect(db) as conn:  # some content, so the cut loses pages the schema points to
            conn.executemany("INSERT INTO sandboxes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", _rows(200))
        conn.close()
        os.truncate(db, db.stat().st_size // 3)
    for args in (["list"], ["list", "--json"], ["stop", "box"], ["rm", "box"]):  # create, run: tests/vm
        line = one_error_line(cli(*args))
        assert f"the state database {db} is damaged" in line, (args, line)
        assert "`agentkernel doctor --repair`" in line, (args, line)


def test_doctor_reports_a_damaged_database_and_repair_sets_it_aside(db: Path) -> None:
    db.write_bytes(b"not a database" * 100)
    report = cli("doctor")
    assert report.returncode == 1
    assert f"the state database {db} is damaged" in report.stdout.decode()
    assert db.read_bytes() == b"not a database" * 100  # only reported

    repair = cli("doctor", "--repair")
    assert repair.returncode == 0, repair.stdout.decode() + repair.stderr.decode()
    (aside,) = db.parent.glob("state.db.damaged-*")
    assert aside.read_bytes() == b"not a database" * 100
    assert f"set aside as {aside}" in repair.stdout.decode()
    assert cli("list").stdout.decode().strip() == "no sandboxes"
    assert cli("doctor").returncode == 0


def _rows(n: int) -> list[tuple[object, ...]]:
    return [
        (f"s{i}", "qemu", "base", "0" * 64, 1, 256, "moderate", "stopped", None, f"/run/x{i}", "2026", "{}")
        for i in range(n)
    ]
