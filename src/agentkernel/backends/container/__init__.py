"""The container backend (podman, else docker; the host's kernel is shared): backend.py, with
rootfs.py (an image as a directory tree) and seccomp.py (the containers' seccomp profiles). Only
the registry entry lives here, so reading it imports nothing heavy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentkernel.backends.registry import BackendInfo, BackendStatus

if TYPE_CHECKING:
    from agentkernel.backends.base import Backend


def status() -> BackendStatus:
    """Whether a container engine runs the hardened sandboxes here (probed once and remembered),
    and which one, or the reason it does not."""
    from agentkernel.backends.container import backend

    return BackendStatus(*backend.status())


def _make(profile: str) -> Backend:
    from agentkernel.backends.container.backend import ContainerBackend

    return ContainerBackend(profile=profile)


INFO = BackendInfo(
    name="container",
    rank=30,
    isolation="container",
    capabilities=frozenset({"shared_dirs", "read_only_root"}),
    probe=status,
    factory=_make,
)
