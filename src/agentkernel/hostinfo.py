"""What this host can run: hardware virtualization (KVM) or software emulation (TCG), and which backends."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from agentkernel.errors import AgentkernelError

KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    note: str  # why not KVM; empty when KVM is used


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_accel(cpuinfo: str | None = None, kvm: Path = KVM_DEVICE) -> Accel:
    """KVM when /dev/kvm opens read-write and the CPU has vmx or svm; TCG otherwise, with the reason.

    A /dev/kvm without vmx/svm in the CPU flags is a paravirtual (PVM) hypervisor that cannot boot a
    stock guest kernel: using it would hang the guest, so it counts as no KVM.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    hw = bool(cpu_flags(cpuinfo) & {"vmx", "svm"})
    if not kvm.exists():
        return Accel("tcg", f"{kvm} does not exist (no KVM module loaded, or not a Linux host)")
    if not os.access(kvm, os.R_OK | os.W_OK):
        return Accel("tcg", f"{kvm} is not readable and writable by this user (add it to the kvm group)")
    if not hw:
        return Accel("tcg", f"{kvm} is present but the CPU has no vmx/svm: a PVM host")
    return Accel("kvm", "")


@cache
def accel() -> Accel:
    return detect_accel()


def qemu_status(acc: Accel) -> BackendStatus:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return BackendStatus(False, "qemu-system-x86_64 not found: apt-get install -y qemu-system-x86")
    how = "with KVM" if acc.name == "kvm" else f"with TCG software emulation ({acc.note})"
    return BackendStatus(True, f"{qemu} {how}")


def firecracker_status(acc: Accel) -> BackendStatus:
    firecracker = shutil.which("firecracker")
    if not firecracker:
        return BackendStatus(False, "firecracker binary not found on PATH")
    if acc.name != "kvm":
        return BackendStatus(False, f"firecracker needs hardware KVM: {acc.note}")
    return BackendStatus(True, f"{firecracker} with KVM")


def backends(current: Accel | None = None) -> dict[str, BackendStatus]:
    """Each backend, whether it can run sandboxes here, and why (not)."""
    acc = current or accel()
    return {"qemu": qemu_status(acc), "firecracker": firecracker_status(acc), "container": container_status()}


def container_status() -> BackendStatus:
    """Whether a container engine (podman, else docker) runs the hardened sandboxes here (probed once
    and remembered), and which one, or the reason it does not."""
    from agentkernel.backends import container

    return BackendStatus(*container.status())


def choose_backend(
    statuses: dict[str, BackendStatus] | None = None,
    current: Accel | None = None,
    *,
    needs_network: bool = False,
) -> str:
    """The backend for a new sandbox when none is asked for: Firecracker (hardware KVM and its binary)
    > QEMU with hardware KVM > a working container engine > QEMU with TCG software emulation.

    The container backend has no egress gateway yet, so a sandbox with network skips it.
    """
    acc = current or accel()
    checks = {
        "qemu": lambda: qemu_status(acc),
        "firecracker": lambda: firecracker_status(acc),
        "container": container_status,  # probes an engine: asked only when it could be chosen
    }

    def usable(name: str) -> bool:
        status = statuses.get(name) if statuses is not None else checks[name]()
        return status is not None and status.available

    # Firecracker's network (a tap in a namespace of its own) needs root.
    if acc.name == "kvm" and usable("firecracker") and (not needs_network or os.geteuid() == 0):
        return "firecracker"
    if acc.name == "kvm" and usable("qemu"):
        return "qemu"
    if not needs_network and usable("container"):
        return "container"
    if usable("qemu"):
        return "qemu"
    found = statuses if statuses is not None else backends(acc)
    reasons = "; ".join(f"{name}: {status.reason}" for name, status in found.items())
    raise AgentkernelError(f"no backend can run sandboxes here: {reasons}")
