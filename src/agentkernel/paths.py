"""Where agentkernel keeps its data: $AGENTKERNEL_HOME, else the platform's user data dir.

Everything under the data dir and the runtime dir is its owner's only: directories 0700, files 0600
(executables 0700), whatever the process umask. The roots are made 0700 on every use, so an older tree
whose files are 0644 is unreachable by other users too. Files made elsewhere (in the user's project)
keep the user's umask: the process umask is never changed. Subprocesses that write under these dirs
(QEMU, qemu-img, cp) are started with PRIVATE_UMASK.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agentkernel.errors import AgentkernelError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time: the thin CLI)
if TYPE_CHECKING:
    from typing import IO, Any, BinaryIO, Literal, TextIO, overload

PRIVATE_UMASK = 0o077  # for subprocesses that create files under the data or runtime dir

_FLAGS = {
    "r+": os.O_RDWR | os.O_CREAT,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,  # FileExistsError for any file or symlink there
}


def data_dir() -> Path:
    home = os.environ.get("AGENTKERNEL_HOME")
    path = Path(home) if home else Path(user_data_dir())
    path.parent.mkdir(parents=True, exist_ok=True)  # ~/.local/share and such: not ours to restrict
    return private_dir(path)


def user_data_dir() -> str:
    """platformdirs' user data dir for agentkernel. On Linux with an absolute HOME and XDG_DATA_HOME
    unset or absolute (the XDG rule every platformdirs release agrees on) it is worked out here:
    importing platformdirs (tempfile, shutil, random) would double the thin command line's start-up."""
    xdg, home = os.environ.get("XDG_DATA_HOME"), os.environ.get("HOME", "")
    if (
        sys.platform == "linux"
        and home.startswith("/")
        and (xdg is None or (xdg.startswith("/") and xdg == xdg.strip()))
    ):
        return os.path.join(xdg or os.path.expanduser("~/.local/share"), "agentkernel")
    import platformdirs

    return platformdirs.user_data_dir("agentkernel", appauthor=False)


def cache_dir() -> Path:
    """Built artifacts (kernels, agents), keyed by the hash of their inputs."""
    return _sub("cache")


def images_dir() -> Path:
    """Root filesystem images, keyed by the hash of their content."""
    return _sub("images")


def logs_dir() -> Path:
    """Build logs of `setup` and `image build`."""
    return _sub("logs")


def tmp_dir() -> Path:
    """Scratch space on the same filesystem as the stores, so finished work is renamed into place."""
    return _sub("tmp")


def _sub(name: str) -> Path:
    return private_dir(data_dir() / name)


def runtime_dir() -> Path:
    """A short, private directory for sockets (Unix socket paths are limited to 107 bytes)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "agentkernel" if xdg else Path(f"/tmp/agentkernel-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = base.lstat()
    if base.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise AgentkernelError(f"{base} is not a private directory of this user: refusing to use it")
    return base


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can use: made 0700 (and so its missing parents), or made
    0700 if it exists with group or other bits (a tree from an older version)."""
    if not path.parent.is_dir():
        private_dir(path.parent)
    try:
        path.mkdir(mode=0o700)  # the mode is masked by the umask, which can only take bits away
    except FileExistsError:
        info = path.stat()
        if info.st_mode & 0o077 and info.st_uid == os.getuid():
            path.chmod(0o700)
    return path


if TYPE_CHECKING:

    @overload
    def open_private(path: Path, mode: Literal["r+", "w", "a", "a+", "x"] = "w") -> TextIO: ...
    @overload
    def open_private(path: Path, mode: Literal["r+b", "wb", "ab", "a+b", "xb"]) -> BinaryIO: ...


def open_private(path: Path, mode: str = "w") -> IO[Any]:
    """`open(path, mode)` for a file only its owner can read (0600 when made, made 0600 if it was not;
    r+ makes it too)."""
    fd = os.open(path, _FLAGS[mode.replace("b", "")] | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, data: str | bytes) -> None:
    """Write `path` (replacing its content) as a file only its owner can read."""
    with open_private(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
