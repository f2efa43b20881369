"""Where agentkernel keeps its data: $AGENTKERNEL_HOME, else the platform's user data dir."""

import os
from pathlib import Path

from platformdirs import user_data_dir

from agentkernel.errors import AgentkernelError


def data_dir() -> Path:
    home = os.environ.get("AGENTKERNEL_HOME")
    path = Path(home) if home else Path(user_data_dir("agentkernel", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    path = data_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_dir() -> Path:
    """A short, private directory for sockets (Unix socket paths are limited to 107 bytes)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "agentkernel" if xdg else Path(f"/tmp/agentkernel-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = base.lstat()
    if base.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise AgentkernelError(f"{base} is not a private directory of this user: refusing to use it")
    return base
