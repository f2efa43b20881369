"""Files under the data dir are their owner's only whatever the umask; shared directories are mapped."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.backends.base import Mount, VMSpec
from agentkernel.backends.qemu.backend import check_mounts, mount_args
from agentkernel.errors import AgentkernelError
from tests.conftest import cli


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_data_dir_and_its_subdirs_are_made_private(isolated_home: Path, no_umask: None) -> None:
    assert paths.data_dir() == isolated_home
    for made in (paths.cache_dir(), paths.images_dir(), paths.logs_dir(), paths.tmp_dir()):
        assert mode(made) == 0o700
    assert mode(isolated_home) == 0o700
    assert mode(paths.private_dir(isolated_home / "a" / "b")) == mode(isolated_home / "a") == 0o700


def test_an_older_data_dir_is_closed_on_first_use(isolated_home: Path) -> None:
    isolated_home.mkdir()
    isolated_home.chmod(0o755)
    old = isolated_home / "state.db"
    old.write_text("")
    old.chmod(0o644)
    result = cli("list", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert mode(isolated_home) == 0o700
    assert mode(old) == 0o600


def test_private_files_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    made = tmp_path / "made"
    paths.write_private(made, "x")
    assert mode(made) == 0o600 and made.read_text() == "x"
    old = tmp_path / "old"
    old.write_text("before\n")
    old.chmod(0o644)
    with paths.open_private(old, "a") as f:
        f.write("after\n")
    assert mode(old) == 0o600 and old.read_text() == "before\nafter\n"


def spec(*mounts: Mount) -> VMSpec:
    return VMSpec("t", Path("/k"), Path("/i"), workdir=Path("/w"), rundir=Path("/r"), mounts=mounts)


def test_shared_directories_keep_the_guests_owners_and_modes_aside(tmp_path: Path) -> None:
    project = tmp_path / "a,b"
    args = mount_args(spec(Mount(project, "/workspace", False), Mount(tmp_path, "/mnt", True)))
    fsdevs = [a for a in args if a.startswith("local,")]
    assert fsdevs == [
        f"local,id=fs0,path={tmp_path}/a,,b,security_model=mapped-xattr",
        f"local,id=fs1,path={tmp_path},security_model=mapped-xattr,readonly=on",
    ]


def test_read_write_sharing_needs_user_xattrs() -> None:
    with pytest.raises(AgentkernelError, match="does not support user extended attributes"):
        check_mounts(spec(Mount(Path("/proc"), "/workspace", False)))
    check_mounts(spec(Mount(Path("/proc"), "/mnt", True)))  # read-only: the guest writes nothing
