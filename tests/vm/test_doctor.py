"""`agentkernel doctor`: a damaged state database is one line for every command, and `--repair` sets it
aside and rebuilds it without losing track of a running VM; a full data dir is one line too."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel import paths
from tests.conftest import cli
from tests.vm.conftest import Artifacts


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 0, f"{args}: {result.stderr.decode()}"
    return result.stdout.decode()


def one_error_line(*args: str) -> str:
    result = cli(*args)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentkernel: error: "), err
    return lines[0]


def listed(name: str) -> dict[str, object]:
    return next(s for s in json.loads(ok("list", "--json")) if s["name"] == name)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_repair_rebuilds_a_garbage_database_and_keeps_the_running_vm(cli_home: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    pid = listed("box")["pid"]
    assert isinstance(pid, int) and alive(pid)
    ok("create", "idle")
    db = cli_home / "state.db"
    db.write_bytes(os.urandom(32 << 10))

    for args in (["list"], ["create", "other"], ["run", "--", "true"], ["exec", "box", "--", "true"]):
        line = one_error_line(*args)
        assert f"the state database {db} is damaged" in line and "`agentkernel doctor --repair`" in line

    report = cli("doctor")
    assert report.returncode == 1 and f"the state database {db} is damaged" in report.stdout.decode()
    repair = cli("doctor", "--repair")
    assert repair.returncode == 0, repair.stdout.decode() + repair.stderr.decode()
    assert len(list(cli_home.glob("state.db.damaged-*"))) == 1
    assert alive(pid)

    box = listed("box")
    assert (box["status"], box["pid"]) == ("running", pid)
    assert listed("idle")["status"] == "stopped"
    assert ok("exec", "box", "--", "echo", "still here").strip() == "still here"
    ok("rm", "-f", "box")
    assert not alive(pid)
    assert cli("doctor").returncode == 0


def test_a_record_lost_from_a_sound_database_is_restored_with_its_vm(cli_home: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    pid = listed("box")["pid"]
    with sqlite3.connect(cli_home / "state.db") as conn:
        conn.execute("DELETE FROM sandboxes WHERE name = 'box'")
    conn.close()
    assert json.loads(ok("list", "--json")) == []

    assert "sandbox 'box' (running) has no record" in cli("doctor").stdout.decode()
    ok("doctor", "--repair")
    assert (listed("box")["status"], listed("box")["pid"]) == ("running", pid)
    ok("rm", "-f", "box")


def test_a_vm_whose_record_is_lost_entirely_is_stopped(cli_home: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    pid = listed("box")["pid"]
    assert isinstance(pid, int)
    (cli_home / "records" / "box.json").unlink()
    (cli_home / "state.db").write_bytes(b"garbage" * 1000)

    repair = cli("doctor", "--repair")
    out = repair.stdout.decode()
    assert f"VMM pid {pid} runs the disk of sandbox 'box', of which no record is left: stopped" in out
    assert not alive(pid)
    assert f"{cli_home / 'sandboxes' / 'box'} is the disk of sandbox 'box'" in out  # reported, kept
    assert repair.returncode == 1  # the disk is left for the user to decide
    assert json.loads(ok("list", "--json")) == []


@pytest.fixture
def full_home(artifacts: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir on a small tmpfs (sharing the built kernel and images), filled up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    real = paths.data_dir()
    home = tmp_path / "full"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", home], check=True)
    try:
        for shared in ("cache", "images"):
            (home / shared).symlink_to(real / shared)
        monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
        monkeypatch.chdir(tmp_path)
        ok("list")  # the database exists, as it would on a data dir in use
        subprocess.run(["dd", "if=/dev/zero", f"of={home / 'filler'}", "bs=64k"], capture_output=True)
        yield home
    finally:
        subprocess.run(["umount", "-l", home], check=False)


def test_a_full_data_dir_is_one_line_and_leaves_no_lock(full_home: Path) -> None:
    # start and stop take the sandbox's lock file before they read the database
    for args in (["create", "box"], ["run", "--", "true"], ["list"], ["start", "box"], ["stop", "box"]):
        line = one_error_line(*args)
        assert str(full_home) in line and "free some space" in line, line
    locks = full_home / "locks"
    assert not locks.exists() or list(locks.iterdir()) == []
    (full_home / "filler").unlink()
    assert json.loads(ok("list", "--json")) == []
