"""Cleaning up after dead builders: what is killed, unmounted and removed, and what never is."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.images import builddir

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path.resolve()) for line in f)


def dead_owner(directory: Path) -> None:
    """An owner file naming this process with another start time: a builder whose pid was reused."""
    start = builddir.start_time(os.getpid())
    assert start is not None
    owner = {"pid": os.getpid(), "start": start - 1, "sessions": []}
    (directory / builddir.OWNER).write_text(json.dumps(owner))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "keep").write_text("the host's")
    return path


def test_a_live_builders_directory_is_left_alone() -> None:
    with builddir.build_dir() as path:
        assert builddir.read_owner(path) is not None
        assert builddir.stale_dirs() == []
        assert builddir.clean_stale() == []
        assert path.is_dir()
    assert not path.exists()


def test_a_dead_builders_directory_goes_with_its_processes() -> None:
    stale = paths.tmp_dir() / "image-dead"
    (stale / "rootfs").mkdir(parents=True)
    dead_owner(stale)
    worker = subprocess.Popen(["sleep", "600"], cwd=stale / "rootfs")  # like a chrooted dpkg
    try:
        assert builddir.stale_dirs() == [stale]
        (cleaned,) = builddir.clean_stale()
        assert cleaned.removed and cleaned.killed == [worker.pid]
        assert worker.wait(timeout=5) == -9
    finally:
        worker.kill()
    assert not stale.exists()


def test_an_old_directory_without_owner_is_stale_once_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = paths.tmp_dir() / "image-legacy"
    legacy.mkdir()
    other = paths.tmp_dir() / "kernel-build"  # not ours to judge
    other.mkdir()
    assert builddir.stale_dirs() == []  # too new: its owner may be about to write the owner file
    monkeypatch.setattr(builddir, "LEGACY_GRACE", -1.0)
    user = subprocess.Popen(["sleep", "600"], cwd=legacy)
    try:
        assert builddir.stale_dirs() == []  # in use
    finally:
        user.kill()
        user.wait()
    assert builddir.stale_dirs() == [legacy]


@root_only
def test_mounts_inside_are_unmounted_and_nothing_outside_is_touched(outside: Path) -> None:
    stale = paths.tmp_dir() / "image-mounted"
    tree = stale / "rootfs"
    for sub in ("dev", "proc", "deep"):
        (tree / sub).mkdir(parents=True)
    dead_owner(stale)
    subprocess.run(["mount", "--bind", outside, tree / "dev"], check=True)  # like mmdebstrap's /dev
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tree / "proc"], check=True)
    (tree / "proc" / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tree / "proc" / "sub"], check=True)  # nested
    other = outside.parent / "other-mount"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", other], check=True)
    (other / "keep").write_text("mounted elsewhere")
    (tree / "deep" / "link").symlink_to(other)  # a symlink out of the tree, to another mount
    try:
        (cleaned,) = builddir.clean_stale()
        assert cleaned.removed, cleaned.describe()
        assert sorted(cleaned.unmounted) == sorted(
            str((tree / p).resolve()) for p in ("dev", "proc", "proc/sub")
        )
        assert not stale.exists()
        assert (outside / "keep").read_text() == "the host's"  # not deleted through the bind mount
        assert mounted(other) and (other / "keep").read_text() == "mounted elsewhere"
    finally:
        subprocess.run(["umount", "-l", other], check=False)
        for sub in ("proc/sub", "proc", "dev"):
            subprocess.run(["umount", "-l", tree / sub], check=False, stderr=subprocess.DEVNULL)


@root_only
def test_a_mount_point_with_a_space_is_unmounted() -> None:
    stale = paths.tmp_dir() / "image-spaced"
    (stale / "a b").mkdir(parents=True)  # listed as a\040b in mountinfo
    dead_owner(stale)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", stale / "a b"], check=True)
    try:
        (cleaned,) = builddir.clean_stale()
        assert cleaned.removed and cleaned.unmounted == [str((stale / "a b").resolve())]
    finally:
        subprocess.run(["umount", "-l", stale / "a b"], check=False, stderr=subprocess.DEVNULL)
