"""Resources run out: the host's disk under a sandbox's disk or under a download, the guest's memory.
What failed says so; the sandbox, and the host, go on."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.faults.conftest import TIMEOUT, Running, error_line, ok, sandbox

pytestmark = pytest.mark.vm

# Allocates (and touches) 16 MiB at a time, without end.
MEMORY_HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"


def test_host_disk_full_under_the_sandbox_disk(
    boot: Callable[..., Running], cli_home: Path, tmpfs: Callable[[Path, str], Path]
) -> None:
    """The overlay cannot grow: the guest's write fails with an I/O error instead of the VM pausing
    (QEMU's default for ENOSPC), and the sandbox runs on."""
    disks = tmpfs(cli_home / "sandboxes", "32m")
    box = boot("box")
    result = cli(
        "exec", box.name, "--", "dd", "if=/dev/urandom", "of=/root/big", "bs=1M", "count=64", "conv=fsync",
        timeout=TIMEOUT,
    )  # fmt: skip
    assert shutil.disk_usage(disks).free < 1 << 20  # the host filesystem did fill up
    assert result.returncode == 1
    assert b"Input/output error" in result.stderr  # the guest sees EIO, not a paused VM
    assert ok("exec", box.name, "--", "echo", "alive") == b"alive\n"
    assert sandbox(box.name)["status"] == "running"
    ok("stop", box.name)
    check = subprocess.run(
        ["qemu-img", "check", str(box.workdir / "disk.qcow2")], capture_output=True, timeout=TIMEOUT
    )
    assert check.returncode in (0, 3), check.stdout  # 3: clusters leaked, harmless; 2 would be corruption
    ok("rm", box.name)
    assert box.leftovers() == []
    assert list(disks.iterdir()) == []


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
