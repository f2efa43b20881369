"""Snapshots of real running sandboxes and forks resumed from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.vm


def ok(*args: str) -> bytes:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def one_line_error(*args: str) -> str:
    result = cli(*args)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def ram_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"agentkernel-{os.getuid()}-*.ram")}


def in_use(ram: str) -> bool:
    """Whether a running VMM (another test's, say) has this RAM file."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and ram.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_snapshot_and_forks(cli_home: Path) -> None:
    shm_before = ram_files()
    ok("create", "--backend", "qemu", "--no-network", "origin")
    ok("start", "origin")
    ok("exec", "origin", "--", "sh", "-c", "echo on-disk > /root/f; echo in-memory > /tmp/m; sync")
    ok("snapshot", "create", "origin", "snap")
    ok("exec", "origin", "--", "sh", "-c", "echo after > /root/f")  # the source runs on
    assert json.loads(ok("snapshot", "list", "--json"))[0]["source"] == "origin"
    ok("fork", "snap", "one")
    ok("fork", "snap", "two")
    for fork in ("one", "two"):
        out = ok("exec", fork, "--", "sh", "-c", "cat /root/f /tmp/m; hostname")
        assert out == f"on-disk\nin-memory\n{fork}\n".encode()
    random = "head -c 16 /dev/urandom | od -An -tx1"
    assert ok("exec", "one", "--", "sh", "-c", random) != ok("exec", "two", "--", "sh", "-c", random)
    ok("exec", "two", "--", "sh", "-c", "echo changed > /root/f")
    assert ok("exec", "one", "--", "cat", "/root/f") == b"on-disk\n"  # forks write their own copy
    assert ok("exec", "origin", "--", "cat", "/root/f") == b"after\n"
    assert "in use by sandboxes one, two" in one_line_error("snapshot", "rm", "snap")
    ok("stop", "one")
    ok("start", "one")  # a fork boots from its own disk after a stop
    assert ok("exec", "one", "--", "cat", "/root/f") == b"on-disk\n"
    ok("rm", "-f", "one", "two", "origin")
    ok("snapshot", "rm", "snap")
    assert json.loads(ok("snapshot", "list", "--json")) == []
    assert [ram for ram in ram_files() - shm_before if not in_use(ram)] == []
    assert list((cli_home / "snapshots").iterdir()) == []


def test_bad_snapshot_requests_leave_nothing(cli_home: Path) -> None:
    assert "no snapshot named 'ghost'" in one_line_error("fork", "ghost", "newbox")
    ok("create", "--backend", "qemu", "--no-network", "idle")
    assert "not running" in one_line_error("snapshot", "create", "idle", "s")
    assert json.loads(ok("snapshot", "list", "--json")) == []
    assert [s["name"] for s in json.loads(ok("list", "--json"))] == ["idle"]
    assert list((cli_home / "snapshots").iterdir()) == []


def test_snapshot_of_another_kernel_is_refused(cli_home: Path) -> None:
    ok("create", "--backend", "qemu", "--no-network", "src")
    ok("start", "src")
    ok("snapshot", "create", "src", "old")
    meta = cli_home / "snapshots" / "old" / "snapshot.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "kernel_sha256": "0" * 64}))
    assert "made with a kernel that is no longer installed" in one_line_error("fork", "old", "copy")
    assert "copy" not in {s["name"] for s in json.loads(ok("list", "--json"))}
