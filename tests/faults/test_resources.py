"""Resources run out: the host's disk under a sandbox's disk or under a download, the guest's memory.
What failed says so; the sandbox, and the host, go on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agentkernel.errors import AgentkernelError
from agentkernel.service import diskspace
from tests.conftest import cli
from tests.faults.conftest import TIMEOUT, Running, error_line, ok, processes_with, sandbox

pytestmark = pytest.mark.vm

# Allocates (and touches) 16 MiB at a time, without end.
MEMORY_HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its filesystem is full."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):  # ENOSPC: full
        while True:
            f.write(bytes(1 << 20))
    return filler


def root_mount(box: Running) -> str:
    """The guest's /proc/mounts line for its root filesystem."""
    return ok("exec", box.name, "--", "grep", " / ", "/proc/mounts").decode()


def test_host_disk_full_under_the_sandbox_disk(
    boot: Callable[..., Running],
    cli_home: Path,
    tmpfs: Callable[[Path, str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sandbox's disk is reserved whole on the host when it is made, so a full host disk does not
    reach it: the guest writes (and syncs) as before, fills its own disk and gets ENOSPC in the command
    that writes, and writes again once it has freed space, its root filesystem read-write throughout.
    A thin disk would fail the guest's writeback instead: the writes lost without a command seeing it,
    and the root filesystem read-only after the failed journal write."""
    monkeypatch.setenv(diskspace.ENV, "1")
    disks = tmpfs(cli_home / "sandboxes", "448m")  # the base image's disk (331 MiB) and some
    box = boot("box")
    filler = fill(disks)
    assert shutil.disk_usage(disks).free < 1 << 20  # the host filesystem did fill up
    ok("exec", box.name, "--", "sh", "-c", "dd if=/dev/urandom of=/root/big bs=1M count=64 && sync")
    result = cli("exec", box.name, "--", "dd", "if=/dev/zero", "of=/root/fill", "bs=1M", timeout=TIMEOUT)
    assert result.returncode == 1
    assert b"No space left on device" in result.stderr  # the guest's own disk is full, and says so
    assert " rw," in root_mount(box)
    ok("exec", box.name, "--", "rm", "/root/fill", "/root/big")
    ok("exec", box.name, "--", "dd", "if=/dev/urandom", "of=/root/again", "bs=1M", "count=16", "conv=fsync")
    digest = ok("exec", box.name, "--", "sha256sum", "/root/again").split()[0]
    assert " rw," in root_mount(box)
    filler.unlink()
    ok("stop", box.name)
    check = subprocess.run(
        ["qemu-img", "check", str(box.workdir / "disk.qcow2")], capture_output=True, timeout=TIMEOUT
    )
    assert check.returncode == 0, check.stdout
    ok("start", box.name)  # what the guest wrote is on its disk
    assert ok("exec", box.name, "--", "sha256sum", "/root/again").split()[0] == digest
    ok("rm", "-f", box.name)
    assert box.leftovers() == []
    assert list(disks.iterdir()) == []


def test_create_without_room_for_the_disk(cli_home: Path, tmpfs: Callable[[Path, str], Path]) -> None:
    disks = tmpfs(cli_home / "sandboxes", "32m")
    result = cli("create", "box", timeout=TIMEOUT)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert re.fullmatch(
        rf"cannot create the sandbox disk: its \d+ MiB are reserved on the host and only (31|32) MiB are "
        rf"free in {re.escape(str(disks))}",
        line,
    ), line
    assert json.loads(ok("list", "--json")) == []
    assert list(disks.iterdir()) == []
    ok("create", "--read-only", "ro")  # a read-only root is never written: nothing to reserve
    assert (disks / "ro" / "disk.qcow2").stat().st_blocks * 512 < 1 << 20


def test_start_below_the_free_space_floor(cli_home: Path) -> None:
    ok("create", "box")
    free = shutil.disk_usage(cli_home).free >> 20
    floor = free + (1 << 20)  # 1 TiB more than there is
    result = cli("start", "box", env={diskspace.ENV: str(floor)}, timeout=TIMEOUT)
    assert result.returncode == 1
    line = error_line(result.stderr)
    workdir = re.escape(str(cli_home / "sandboxes" / "box"))
    assert re.fullmatch(
        rf"not enough free disk space to start a sandbox: \d+ MiB free in {workdir}, {floor} MiB needed "
        rf"\(resources\.min_free_disk_mb in agentkernel\.toml, or \${diskspace.ENV}\)",
        line,
    ), line
    assert sandbox("box")["status"] == "stopped"  # nothing was started
    assert processes_with(str(cli_home / "sandboxes" / "box")) == []


def test_free_space_floor_from_the_project_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(diskspace.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert diskspace.floor_mb() == diskspace.DEFAULT_FLOOR_MB
    (tmp_path / "agentkernel.toml").write_text("[resources]\nmin_free_disk_mb = 5000000\n")
    assert diskspace.floor_mb() == 5000000
    with pytest.raises(AgentkernelError, match=r"^not enough free disk space to start a sandbox: \d+ MiB"):
        diskspace.check_floor(tmp_path)
    monkeypatch.setenv(diskspace.ENV, "0")
    diskspace.check_floor(tmp_path)
    monkeypatch.setenv(diskspace.ENV, "lots")
    with pytest.raises(AgentkernelError, match=r"AGENTKERNEL_MIN_FREE_DISK_MB must be a whole number"):
        diskspace.floor_mb()


def test_download_into_a_full_directory(
    boot: Callable[..., Running], tmp_path: Path, tmpfs: Callable[[Path, str], Path]
) -> None:
    box = boot("box")
    ok("exec", box.name, "--", "sh", "-c", "head -c 4000000 /dev/urandom > /tmp/blob")
    full = tmpfs(tmp_path / "full", "1m")
    result = cli("cp", f"{box.name}:/tmp/blob", str(full / "blob"), timeout=TIMEOUT)
    assert result.returncode == 1
    assert error_line(result.stderr) == f"cp: cannot write {full / 'blob'}: No space left on device"
    assert list(full.iterdir()) == []  # no partial file: neither the target nor its .part
    # The agent finished with the aborted transfer: the same file still comes over whole.
    ok("cp", f"{box.name}:/tmp/blob", str(tmp_path / "blob"))
    digest = ok("exec", box.name, "--", "sha256sum", "/tmp/blob").split()[0].decode()
    assert hashlib.sha256((tmp_path / "blob").read_bytes()).hexdigest() == digest


def test_guest_out_of_memory(boot: Callable[..., Running]) -> None:
    box = boot("hog", "--image", "python", "--memory", "256")
    result = cli("exec", box.name, "--", "python3", "-c", MEMORY_HOG, timeout=TIMEOUT)
    assert (result.returncode, result.stderr) == (137, b"")  # SIGKILL from the OOM killer, not MemoryError
    assert ok("exec", box.name, "--", "echo", "alive") == b"alive\n"
    assert sandbox(box.name)["status"] == "running"
    events = ok("exec", box.name, "--", "cat", "/sys/fs/cgroup/sandbox/memory.events").decode()
    assert "oom_kill 1\n" in events
    assert b"Memory cgroup out of memory: Killed process" in ok("logs", box.name)
    ok("rm", "-f", box.name)
    assert box.leftovers() == []
