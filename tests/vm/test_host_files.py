"""The host files a sandbox can touch: what the guest does to owners, modes and file types in a shared
directory stays in the guest, and agentkernel's own files are private to the user who runs it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends.qemu.backend import ram_file
from agentkernel.service import sandboxes
from tests.conftest import cli

pytestmark = pytest.mark.vm

# Run in the guest (as root) in the shared directory: each line tries to put something on the host
# that only root may make there, then the guest's own view of the results.
ATTEMPTS = """
cd /workspace
echo payload > suid; chown 0:0 suid; chmod 4755 suid
echo mine > owned; chown 12345:23456 owned
mkdir sgid; chmod 2777 sgid
ln -s /etc/shadow link
mknod null c 1 3; mknod fifo p
stat -c '%n %u %g %a %F' suid owned sgid link null fifo
readlink link
"""


def ok(*args: str, env: dict[str, str] | None = None) -> bytes:
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_guest_owners_modes_and_file_types_stay_in_the_guest(cli_home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    out = ok("run", "--dir", str(project), "--", "sh", "-c", ATTEMPTS).decode()
    # The guest sees what it did.
    seen = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()[:-1]}
    assert seen == {
        "suid": "0 0 4755 regular file",
        "owned": "12345 23456 644 regular file",
        "sgid": "0 0 2777 directory",
        "link": "0 0 777 symbolic link",
        "null": "0 0 644 character special file",
        "fifo": "0 0 644 fifo",
    }
    assert out.splitlines()[-1] == "/etc/shadow"
    # The host has plain files and directories of the VMM's user, with no set-id bits.
    for name in seen:
        info = (project / name).lstat()
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid()), name
        assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), name
        kind = stat.S_IFDIR if name == "sgid" else stat.S_IFREG
        assert stat.S_IFMT(info.st_mode) == kind, name
    assert (project / "link").read_text() == "/etc/shadow"  # its target as content: a file, not a link
    # The user who ran it can read and write what the guest made.
    with (project / "suid").open("r+") as f:
        assert f.read() == "payload\n"
        f.write("edited\n")


def test_the_read_only_home_stays_as_it_is(cli_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "user"
    home.mkdir()
    (home / "notes").write_text("mine\n")
    (home / "notes").chmod(0o640)
    script = "cat /mnt/notes; chown 0:0 /mnt/notes || echo refused; chmod 4755 /mnt/notes || echo refused"
    out = ok("run", "--profile", "permissive", "--", "sh", "-c", script, env={"HOME": str(home)})
    assert out.decode().split() == ["mine", "refused", "refused"]
    info = (home / "notes").lstat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o640)


def test_shared_directory_with_a_comma_in_its_path(cli_home: Path, tmp_path: Path) -> None:
    """A comma in the path would end QEMU's -fsdev path option and start another one."""
    project = tmp_path / "a,security_model=passthrough"
    project.mkdir()
    (project / "in.txt").write_text("from the host\n")
    out = ok("run", "--dir", str(project), "--", "sh", "-c", "cat /workspace/in.txt; echo x > /workspace/o")
    assert out == b"from the host\n"
    assert (project / "o").lstat().st_uid == os.getuid()


def test_sharing_read_write_needs_user_xattrs(cli_home: Path) -> None:
    result = cli("run", "--dir", "/proc", "--", "true")  # procfs keeps no user.* attributes
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "does not support user extended attributes" in lines[0], lines


# ---- the data dir and the runtime dir ----------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def exposed(top: Path) -> list[str]:
    """Every file or directory under `top` (itself included) with a group or other permission bit;
    symlinks are not followed (the test data dir links to the real one's cache and images)."""
    found = []
    for root, dirs, files in os.walk(top):
        for path in [Path(root)] + [Path(root) / n for n in dirs + files]:
            with contextlib.suppress(FileNotFoundError):  # a file the sandbox removed meanwhile
                info = path.lstat()
                if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o077:
                    found.append(f"{path} {stat.filemode(info.st_mode)}")
    return sorted(set(found))


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime dir of this test's own, on a short path (Unix socket paths are limited)."""
    base = Path(tempfile.mkdtemp(prefix="akrt-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base / "agentkernel"
    shutil.rmtree(base, ignore_errors=True)


def test_data_and_runtime_dirs_are_private_whatever_the_umask(
    cli_home: Path, runtime: Path, tmp_path: Path
) -> None:
    cli_home.chmod(0o755)  # as an older version left it
    (tmp_path / "up.txt").write_text("to the guest\n")

    def check(booted: str | None = None) -> None:
        assert exposed(cli_home) == []
        assert exposed(runtime) == []
        if booted is not None:  # its RAM, a file on /dev/shm (a fork's is the snapshot's, mapped)
            ram = ram_file(sandboxes.spec_of(sandboxes.get(booted)))
            assert stat.S_IMODE(ram.stat().st_mode) == 0o600, ram

    with umask(0):  # what the process is given must not matter
        ok("create", "--backend", "qemu", "box")  # the default profile: with network (the gateway)
        ok("start", "box")
        ok("exec", "box", "--", "sh", "-c", "echo from the guest > /root/f; chmod 644 /root/f")
        ok("cp", str(tmp_path / "up.txt"), "box:/root/up.txt")
        ok("cp", "box:/root/f", str(tmp_path / "down.txt"))
        check("box")
        ok("stop", "box")
        ok("create", "--backend", "qemu", "--no-network", "source")
        ok("start", "source")
        ok("snapshot", "create", "source", "snap")
        ok("fork", "snap", "copy")
        assert ok("exec", "copy", "--", "hostname") == b"copy\n"
        check("source")
        ok("stop", "source")
        ok("stop", "copy")
        check()
    # Files made in the user's own directories keep ordinary modes: the guest's file's, here.
    assert stat.S_IMODE((tmp_path / "down.txt").stat().st_mode) == 0o644
    assert json.loads(ok("list", "--json"))  # the records are still there to be read
