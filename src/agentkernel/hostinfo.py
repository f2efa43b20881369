"""What this host can run: hardware virtualization (KVM) or software emulation (TCG), and which backends."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from agentkernel.backends import registry
from agentkernel.backends.registry import BackendInfo, BackendStatus, Capability, HostFeature
from agentkernel.errors import AgentkernelError

KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    note: str  # why not KVM; empty when KVM is used


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


def backends() -> dict[str, BackendStatus]:
    """Each registered backend, preferred first, whether it can run sandboxes here, and why (not)."""
    return {info.name: info.probe() for info in registry.registered()}


def select_backend(
    requested: str | None,
    *,
    needs_network: bool,
    kvm: bool,
    root: bool,
    status: Callable[[str], BackendStatus],
    candidates: Iterable[BackendInfo] | None = None,
) -> str:
    """The backend for a new sandbox: `requested` if it is registered, else the first of the
    registered backends (`candidates`, preferred first) that has what the sandbox needs and can run
    here: Firecracker (hardware KVM and its binary) > QEMU (KVM, else TCG emulation) > a container.

    A sandbox runs in a VM whenever a VMM can run at all, slow emulation included: a container shares
    the host's kernel, so it ranks last, and is chosen only when asked for or when no VMM can run
    here (and then the caller says so, see isolation_warning). `status` is asked lazily, best
    first: the container engine's probe runs only when no VMM can. A backend whose capability needs
    a host feature (Firecracker's network needs `root`) is passed over when the host lacks it.
    """
    entries = registry.registered() if candidates is None else list(candidates)
    if requested is not None:
        if requested not in [entry.name for entry in entries]:
            raise AgentkernelError(
                f"unknown backend {requested!r}: use {', '.join(entry.name for entry in entries)}"
            )
        return requested
    needs: frozenset[Capability] = frozenset({"network"}) if needs_network else frozenset()
    host: set[HostFeature] = set()
    if kvm:
        host.add("kvm")
    if root:
        host.add("root")
    for entry in entries:
        if entry.supports(needs, host=frozenset(host)) and status(entry.name).available:
            return entry.name
    reasons = "; ".join(f"{entry.name}: {status(entry.name).reason}" for entry in entries)
    if lacking := [entry.name for entry in entries if not needs <= entry.capabilities]:
        reasons += f"; a sandbox with network cannot run on {', '.join(lacking)} (no network)"
    raise AgentkernelError(f"no backend can run sandboxes here: {reasons}")


def choose_backend(requested: str | None = None, *, needs_network: bool) -> str:
    """select_backend() with this host's capabilities and the registered backends' probes."""
    return select_backend(
        requested,
        needs_network=needs_network,
        kvm=accel().name == "kvm",
        root=os.geteuid() == 0,
        status=lambda name: registry.info(name).probe(),
    )


def isolation_warning(backend: str) -> str | None:
    """The one line said wherever a sandbox runs in a container rather than a VM (None for a VM)."""
    if registry.info(backend).isolation == "vm":
        return None
    return "warning: this sandbox is a container (it shares the host's kernel), not a virtual machine"


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def available_memory() -> int:
    """Bytes the host can still give processes without swapping (/proc/meminfo's MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AgentkernelError("no MemAvailable in /proc/meminfo")
