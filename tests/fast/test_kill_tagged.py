"""A sandbox's processes are killed even when finding them takes longer than the kill's wait (a
loaded host: `bench stress` left VMMs running after their sandboxes were removed)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agentkernel.backends import base


def test_what_a_slow_scan_finds_is_still_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rundir = tmp_path / "run"
    proc = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 600', f"{rundir}/qemu.pid"])
    try:
        deadline = time.monotonic() + 10
        while not base.tagged(str(rundir)):  # until bash has exec'd `sleep` under that name
            assert time.monotonic() < deadline
            time.sleep(0.01)
        scan = base.tagged

        def slow_scan(*tags: str) -> list[int]:
            found = scan(*tags)
            time.sleep(0.2)  # a scan of /proc that outlasts the wait below
            return found

        monkeypatch.setattr(base, "tagged", slow_scan)
        monkeypatch.setattr(base, "KILL_WAIT", 0.1)
        base.kill_tagged(str(rundir))
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()
        proc.wait()
