"""The exec file a running sandbox's session writes for the thin command line: private, valid only for
the VMM it names, and anything damaged or foreign in it read as no file (the full CLI then runs)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from agentkernel.service import exec_file


def write(rundir: Path, pid: int = 41) -> None:
    exec_file.write(
        rundir,
        pid=pid,
        sockets=[rundir / "agent0.sock"],
        hello={"hostname": "box", "max_procs": 64, "memory_mb": 512},
        passed={"LANG"},
        env={"A": "1"},
        command_env={"HTTP_PROXY": f"http://{exec_file.COMMAND_MARK}:pw@proxy"},
    )


def test_it_is_private_and_only_for_its_vmm(tmp_path: Path) -> None:
    write(tmp_path)
    assert stat.S_IMODE((tmp_path / exec_file.NAME).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [exec_file.NAME]  # no temporary file left
    assert exec_file.read(tmp_path, 42) is None  # another VMM (a restart, a reused run directory)
    data = exec_file.read(tmp_path, 41)
    assert data is not None
    env = exec_file.command_env(data, "c-0000abcd", {"LANG": "C", "LC_ALL": "C", "HOME": "/root"})
    assert env == {"LANG": "C", "LC_ALL": "C", "A": "1", "HTTP_PROXY": "http://c-0000abcd:pw@proxy"}


def test_damaged_or_mistyped_contents_are_no_file(tmp_path: Path) -> None:
    write(tmp_path)
    good = json.loads((tmp_path / exec_file.NAME).read_text())
    for damage in (
        {"sockets": []},
        {"sockets": [3]},
        {"hello": {"hostname": 3}},
        {"hello": {"hostname": "box", "max_procs": True}},
        {"env": {"A": 1}},
        {"command_env": []},
        {"passed": "LANG"},
    ):
        (tmp_path / exec_file.NAME).write_text(json.dumps({**good, **damage}))
        assert exec_file.read(tmp_path, 41) is None, damage
    (tmp_path / exec_file.NAME).write_text('{"pid": 41')
    assert exec_file.read(tmp_path, 41) is None
    (tmp_path / exec_file.NAME).unlink()
    assert exec_file.read(tmp_path, 41) is None
