"""Extracting an ext4 image to a tree with debugfs: every kind of entry and its metadata survive."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from agentkernel.backends.container import rootfs
from agentkernel.errors import AgentkernelError


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An ext4 image (made by mkfs.ext4 -d, as our images are) with the awkward cases in it."""
    src = tmp_path / "src"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "file").write_text("hi\n")
    os.link(src / "d" / "file", src / "d" / "hard")
    os.chmod(src / "d" / "file", 0o4755)
    (src / "sticky").mkdir()
    os.chmod(src / "sticky", 0o1777)
    (src / "sticky" / "link").symlink_to("../d/file")
    (src / "dangling").symlink_to("/no/such/target")
    os.mkfifo(src / "fifo", 0o640)
    os.chown(src / "d" / "sub", 1000, 1001)
    odd = src / "with space"
    odd.mkdir()
    (odd / "naïve ☃").write_text("é\n")
    os.chmod(odd, 0o2750)
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    out = tmp_path / "image.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(out), "8M"], check=True)
    return out


def test_tree_matches_the_image(image: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    entries = rootfs.extract(image, tree)
    by_path = {e.path: e for e in entries}
    assert stat.S_IMODE((tree / "d" / "file").stat().st_mode) == 0o4755  # set-id bits kept
    assert stat.S_IMODE((tree / "sticky").stat().st_mode) == 0o1777  # sticky bit kept
    assert stat.S_IMODE((tree / "with space").stat().st_mode) == 0o2750
    assert (tree / "d" / "file").stat().st_ino == (tree / "d" / "hard").stat().st_ino  # a link, not a copy
    assert os.readlink(tree / "sticky" / "link") == "../d/file"
    assert os.readlink(tree / "dangling") == "/no/such/target"
    assert stat.S_ISFIFO((tree / "fifo").lstat().st_mode)
    assert stat.S_IMODE((tree / "fifo").lstat().st_mode) == 0o640
    assert ((tree / "d" / "sub").stat().st_uid, (tree / "d" / "sub").stat().st_gid) == (1000, 1001)
    assert (tree / "with space" / "naïve ☃").read_text() == "é\n"
    assert not (tree / "null").exists() and "null" in by_path  # devices are left out on purpose
    assert rootfs.verify(tree, entries) == []


def test_verify_reports_differences(image: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    entries = rootfs.extract(image, tree)
    os.chmod(tree / "sticky", 0o777)
    (tree / "d" / "hard").unlink()
    problems = rootfs.verify(tree, entries)
    assert any(p.startswith("sticky: mode 777") for p in problems)
    assert any(p.startswith("d/hard:") for p in problems)


def test_ensure_tree_is_cached_per_digest(image: Path, isolated_home: Path) -> None:
    first = rootfs.ensure_tree(image)
    assert first.parent == isolated_home / "cache" / "rootfs"
    assert first.name == rootfs.image_digest(image)
    assert rootfs.ensure_tree(image) == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no scratch left behind


def test_unquotable_paths_are_refused() -> None:
    with pytest.raises(AgentkernelError, match="cannot quote"):
        rootfs._quoted('a"b')


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other uids needs root")
def test_owners_moved_into_a_user_namespace_range(image: Path, isolated_home: Path) -> None:
    shifted = rootfs.ensure_tree(image, shift=(700000000, 700100000))
    assert shifted != rootfs.ensure_tree(image)  # a tree of its own per range
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [shifted, *shifted.rglob("*")]}
    assert owners == {(700000000, 700100000), (700001000, 700101001)}  # root's, and d/sub's 1000:1001
    assert stat.S_IMODE((shifted / "d" / "file").stat().st_mode) == 0o4755  # chown kept the set-id bit
