"""The Firecracker backend (hardware KVM only): backend.py, with api.py (its REST API client),
console.py (the console log writer), version.py (which release runs here). Only the registry entry
lives here, so reading it imports nothing heavy."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from agentkernel.backends.registry import BackendInfo, BackendStatus

if TYPE_CHECKING:
    from agentkernel.backends.base import Backend


def status() -> BackendStatus:
    from agentkernel import hostinfo

    firecracker = shutil.which("firecracker")
    if not firecracker:
        return BackendStatus(False, "firecracker binary not found on PATH")
    acc = hostinfo.accel()
    if acc.name != "kvm":
        return BackendStatus(False, f"firecracker needs hardware KVM: {acc.note}")
    from agentkernel.backends.firecracker.version import check_version
    from agentkernel.errors import AgentkernelError

    try:  # a release below the floor is not offered: a sandbox made on it would fail to start
        release = check_version(firecracker)
    except AgentkernelError as exc:
        return BackendStatus(False, str(exc))
    return BackendStatus(True, f"{firecracker} (Firecracker {release}) with KVM")


def _make(profile: str) -> Backend:
    from agentkernel.backends.firecracker.backend import FirecrackerBackend, Jailer

    return FirecrackerBackend(jailer=Jailer.from_env())


INFO = BackendInfo(
    name="firecracker",
    rank=10,
    isolation="vm",
    capabilities=frozenset({"snapshot", "network", "read_only_root"}),
    probe=status,
    factory=_make,
    requires=frozenset({"kvm"}),
    requires_for=(("network", "root"),),  # a tap device in a network namespace of its own
)
