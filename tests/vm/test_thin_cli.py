"""The thin command line with a real VM: `ls` of a running sandbox is done on the standard library and
prints what the full CLI prints; once its VMM has died, `ls` goes to the full CLI, which reconciles the
record, and both print the same again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import cli, either_cli

pytestmark = pytest.mark.vm


def ls(*args: str, full: bool = False, trace: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return either_cli("ls", *args, full=full, trace=trace, timeout=120)


def test_ls_of_a_running_vm_thin_and_after_its_vmm_died(cli_home: Path, tmp_path: Path) -> None:
    assert cli("create", "thinbox").returncode == 0
    assert cli("start", "thinbox").returncode == 0
    trace = tmp_path / "trace"
    fast, full = ls(trace=trace), ls(full=True)
    assert trace.exists()  # done thin
    assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr)
    assert fast.stdout.decode().splitlines()[1].split()[:3] == ["thinbox", "running", "qemu"]

    os.kill(vmm_pid(), signal.SIGKILL)
    time.sleep(0.2)
    trace.unlink()
    fast = ls(trace=trace)
    assert not trace.exists()  # a dead VMM: the full CLI reconciled it
    full = ls(full=True)
    assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr)
    assert fast.stdout.decode().splitlines()[1].split()[:2] == ["thinbox", "failed"]
    assert cli("rm", "thinbox").returncode == 0


def vmm_pid() -> int:
    (record,) = json.loads(cli("list", "--json").stdout)
    assert isinstance(record["pid"], int)
    return int(record["pid"])
