"""A killed image build leaves nothing behind: no process, no mount under the data dir, no files.

Each test starts a real `agentkernel image build python` (mmdebstrap, as root) in a subprocess with
an isolated AGENTKERNEL_HOME, waits until mmdebstrap has mounted /proc, /sys and /dev in its tree, and
kills the CLI: SIGTERM, SIGINT and SIGHUP must clean up within 5 s; after SIGKILL the next build or
`agentkernel doctor --repair` must.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.images import builddir
from tests.conftest import cli

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap mounts in its tree only as root"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap is not installed"),
]

MOUNT_WAIT = 300.0  # mmdebstrap downloads the essential packages first; slow when the CPUs are busy


@pytest.fixture
def build_home(home: Path, agent: Path) -> Iterator[Path]:
    """The isolated data dir with a stand-in agent where `image build` looks for the built one."""
    entry = home / "cache" / "agent" / "test"
    entry.mkdir(parents=True)
    shutil.copyfile(agent, entry / "agentkernel-agent")
    (entry / "agentkernel-agent").chmod(0o755)
    (home / "cache" / "agent" / "current").write_text("test")
    yield home
    for path in builddir.stale_dirs():  # whatever a failed test left, so it does not leak into others
        builddir._clean(path)


def mounts_under(path: Path) -> list[str]:
    prefix = f"{path.resolve()}/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def processes_using(path: Path) -> list[str]:
    needle = str(path.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                pass
    return found


def start_build(home: Path) -> subprocess.Popen[bytes]:
    """`image build python`, returned once mmdebstrap has mounted filesystems in its tree."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "image", "build", "python"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + MOUNT_WAIT
    while len(mounts_under(home / "tmp")) < 3:  # dev/pts, dev/shm, sys, proc
        if proc.poll() is not None:
            pytest.fail(f"the build ended before mounting: {proc.communicate()[1].decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mmdebstrap mounted nothing in time")
        time.sleep(0.1)
    return proc


def assert_clean(home: Path) -> None:
    tmp = home / "tmp"
    assert mounts_under(tmp) == []
    assert processes_using(tmp) == []
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stopped_build_cleans_up_within_5s(build_home: Path, sig: signal.Signals) -> None:
    proc = start_build(build_home)
    (build,) = (build_home / "tmp").iterdir()
    assert processes_using(build)  # mmdebstrap and its children are at work
    proc.send_signal(sig)
    start = time.monotonic()
    _, err = proc.communicate(timeout=5)
    took = time.monotonic() - start
    assert took < 5
    assert proc.returncode == 128 + sig, err.decode()  # as if the signal had ended it
    assert "Traceback" not in err.decode()
    assert err.decode().strip().endswith(f"agentkernel: interrupted by {sig.name}")
    assert_clean(build_home)


def test_after_sigkill_doctor_reports_and_repair_cleans(build_home: Path) -> None:
    proc = start_build(build_home)
    proc.kill()
    proc.wait()
    (build,) = (build_home / "tmp").iterdir()
    assert mounts_under(build)  # what a killed builder leaves: mmdebstrap runs on, with its mounts

    report = cli("doctor")
    assert report.returncode == 1
    assert f"stale build directory {build} of a dead build" in report.stdout.decode()
    assert build.exists()  # only reported

    repair = cli("doctor", "--repair")
    assert repair.returncode == 0, repair.stdout.decode() + repair.stderr.decode()
    assert f"stale build directory {build}: killed" in repair.stdout.decode()
    assert_clean(build_home)


def test_after_sigkill_the_next_build_cleans(build_home: Path) -> None:
    proc = start_build(build_home)
    proc.kill()
    proc.wait()
    (build,) = (build_home / "tmp").iterdir()
    assert mounts_under(build)

    result = cli("image", "build", "base")  # busybox: no mmdebstrap, quick
    assert result.returncode == 0, result.stderr.decode()
    assert f"stale build directory {build}: killed" in result.stderr.decode()
    assert_clean(build_home)
