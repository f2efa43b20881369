"""What this host can run: hardware virtualization (KVM) or software emulation (TCG), and which backends."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import get_args

from agentkernel.config import BackendName
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


BACKENDS: tuple[str, ...] = get_args(BackendName)
VMMS = ("firecracker", "qemu")


def select_backend(
    requested: str | None,
    *,
    needs_network: bool,
    kvm: bool,
    root: bool,
    status: Callable[[str], BackendStatus],
) -> str:
    """The backend for a new sandbox: `requested` if given, else the first that can run here of
    Firecracker (hardware KVM and its binary) > QEMU with KVM > QEMU with TCG emulation > a container.

    A sandbox runs in a VM whenever a VMM can run at all, slow emulation included: a container shares
    the host's kernel, so it is chosen only when asked for or when no VMM exists here (and then the
    caller says so, see isolation_warning). `status` is asked lazily: the container engine's probe
    runs only when no VMM can. Firecracker's network (a tap in a namespace of its own) needs `root`;
    the container backend has no network.
    """
    if requested is not None:
        if requested not in BACKENDS:
            raise AgentkernelError(f"unknown backend {requested!r}: use {', '.join(BACKENDS)}")
        return requested
    if kvm and status("firecracker").available and (root or not needs_network):
        return "firecracker"
    if status("qemu").available:
        return "qemu"
    if not needs_network and status("container").available:
        return "container"
    reasons = "; ".join(f"{name}: {status(name).reason}" for name in BACKENDS)
    if needs_network:
        reasons += "; a sandbox with network needs a VM (the container backend has no network)"
    raise AgentkernelError(f"no backend can run sandboxes here: {reasons}")


def choose_backend(requested: str | None = None, *, needs_network: bool) -> str:
    """select_backend() with this host's capabilities."""
    acc = accel()
    checks: dict[str, Callable[[], BackendStatus]] = {
        "qemu": lambda: qemu_status(acc),
        "firecracker": lambda: firecracker_status(acc),
        "container": container_status,
    }
    return select_backend(
        requested,
        needs_network=needs_network,
        kvm=acc.name == "kvm",
        root=os.geteuid() == 0,
        status=lambda name: checks[name](),
    )


def isolation_warning(backend: str) -> str | None:
    """The one line said wherever a sandbox runs in a container rather than a VM (None for a VM)."""
    if backend in VMMS:
        return None
    return "warning: this sandbox is a container (it shares the host's kernel), not a virtual machine"
