"""The QEMU backend (`-M microvm`, KVM or TCG software emulation): backend.py, and qmp.py, its
control-socket client. Only the registry entry lives here, so reading it imports nothing heavy."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from agentkernel.backends.registry import BackendInfo, BackendStatus

if TYPE_CHECKING:
    from agentkernel.backends.base import Backend


def status() -> BackendStatus:
    from agentkernel import hostinfo

    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return BackendStatus(False, "qemu-system-x86_64 not found: apt-get install -y qemu-system-x86")
    acc = hostinfo.accel()
    how = "with KVM" if acc.name == "kvm" else f"with TCG software emulation ({acc.note})"
    return BackendStatus(True, f"{qemu} {how}")


def _make(profile: str) -> Backend:
    from agentkernel.backends.qemu.backend import QemuBackend

    return QemuBackend()


INFO = BackendInfo(
    name="qemu",
    rank=20,
    isolation="vm",
    capabilities=frozenset({"snapshot", "pause", "network", "shared_dirs", "read_only_root"}),
    probe=status,
    factory=_make,
)
