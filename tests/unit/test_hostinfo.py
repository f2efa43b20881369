from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from agentkernel import hostinfo
from agentkernel.backends import registry
from agentkernel.errors import AgentkernelError
from agentkernel.hostinfo import BackendStatus, detect_accel, select_backend

VMX = "processor : 0\nflags\t\t: fpu vme vmx sse\n"
NO_VMX = "processor : 0\nflags\t\t: fpu vme sse hypervisor\n"


def test_kvm_needs_device_and_cpu_flags(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    assert detect_accel(VMX, dev).name == "kvm"
    pvm = detect_accel(NO_VMX, dev)
    assert pvm.name == "tcg"
    assert "PVM" in pvm.note and "vmx/svm" in pvm.note


def test_no_device(tmp_path: Path) -> None:
    acc = detect_accel(VMX, tmp_path / "missing")
    assert acc.name == "tcg"
    assert "does not exist" in acc.note


# ---- backend selection: a pure function of what the host has ---------------------------------------

YES, NO = BackendStatus(True, "works"), BackendStatus(False, "missing")


def select(
    *,
    kvm: bool,
    firecracker: bool,
    qemu: bool,
    podman: bool,
    network: bool,
    requested: str | None = None,
    root: bool = True,
    asked: list[str] | None = None,
) -> str:
    statuses = {"firecracker": firecracker, "qemu": qemu, "container": podman}

    def status(name: str) -> BackendStatus:
        if asked is not None:
            asked.append(name)
        return YES if statuses[name] else NO

    built_in = [registry.info(name) for name in registry.BUILTIN]  # whatever else a test registered
    return select_backend(
        requested, needs_network=network, kvm=kvm, root=root, status=status, candidates=built_in
    )


@pytest.mark.parametrize(
    ("kvm", "firecracker", "qemu", "podman", "network", "requested", "expected"),
    [
        # KVM: Firecracker when it is installed, else QEMU; a working podman changes nothing.
        (True, True, True, True, False, None, "firecracker"),
        (True, True, True, True, True, None, "firecracker"),
        (True, False, True, True, False, None, "qemu"),
        (True, False, True, True, True, None, "qemu"),
        (True, True, False, True, False, None, "firecracker"),
        # No KVM (this machine): QEMU under TCG, never the container, with or without network.
        (False, False, True, True, False, None, "qemu"),
        (False, False, True, True, True, None, "qemu"),
        (False, True, True, True, False, None, "qemu"),  # Firecracker needs hardware KVM
        (False, False, True, False, False, None, "qemu"),
        (False, False, True, False, True, None, "qemu"),
        # No VMM at all: a container, for sandboxes without network only.
        (False, False, False, True, False, None, "container"),
        (True, False, False, True, False, None, "container"),
        (False, True, False, True, False, None, "container"),
        # Asked for: as asked, whatever the host has.
        (False, False, True, True, False, "container", "container"),
        (True, True, True, True, True, "container", "container"),
        (False, False, True, True, False, "qemu", "qemu"),
        (True, True, True, True, False, "qemu", "qemu"),
        (False, False, False, False, False, "firecracker", "firecracker"),
    ],
)
def test_selection_table(
    kvm: bool,
    firecracker: bool,
    qemu: bool,
    podman: bool,
    network: bool,
    requested: str | None,
    expected: str,
) -> None:
    chosen = select(
        kvm=kvm, firecracker=firecracker, qemu=qemu, podman=podman, network=network, requested=requested
    )
    assert chosen == expected


@pytest.mark.parametrize(
    ("kvm", "firecracker", "qemu", "podman", "network"), list(itertools.product([True, False], repeat=5))
)
def test_a_vm_whenever_a_vmm_can_run(
    kvm: bool, firecracker: bool, qemu: bool, podman: bool, network: bool
) -> None:
    """Every host: without a request, a container only where neither QEMU nor Firecracker can run."""
    vmm = qemu or (kvm and firecracker)
    asked: list[str] = []
    try:
        chosen = select(
            kvm=kvm, firecracker=firecracker, qemu=qemu, podman=podman, network=network, asked=asked
        )
    except AgentkernelError as exc:
        assert not vmm and (network or not podman)
        assert str(exc).startswith("no backend can run sandboxes here: ")
        return
    assert (chosen == "container") == (not vmm)
    assert (hostinfo.isolation_warning(chosen) is None) == vmm
    assert ("container" in asked) == (not vmm)  # the engine is probed only when no VMM can run


def test_firecracker_network_needs_root() -> None:
    args = {"kvm": True, "firecracker": True, "qemu": True, "podman": True}
    assert select(**args, network=True, root=False) == "qemu"
    assert select(**args, network=False, root=False) == "firecracker"
    assert select(**args, network=True, root=True) == "firecracker"


def test_nothing_usable_says_why_for_each_backend() -> None:
    with pytest.raises(AgentkernelError) as caught:
        select(kvm=False, firecracker=False, qemu=False, podman=True, network=True)
    message = str(caught.value)
    assert "qemu: missing" in message and "firecracker: missing" in message
    assert "a sandbox with network cannot run on container (no network)" in message and "\n" not in message


def test_unknown_backend_is_one_line() -> None:
    with pytest.raises(AgentkernelError, match=r"^unknown backend 'lxc': use firecracker, qemu, container$"):
        select(kvm=True, firecracker=True, qemu=True, podman=True, network=False, requested="lxc")


def test_isolation_warning_only_for_containers() -> None:
    assert hostinfo.isolation_warning("qemu") is None
    assert hostinfo.isolation_warning("firecracker") is None
    warning = hostinfo.isolation_warning("container")
    assert warning is not None and "container" in warning and "not a virtual machine" in warning
    assert "\n" not in warning
