"""The guest kernel against Firecracker's own guest config (microvm-kernel-ci-x86_64-6.1.config here:
an unchanged copy of Firecracker's resources/guest_configs file, Apache-2.0, see FIRECRACKER-NOTICE),
the reference for what a Firecracker guest needs: every device Firecracker offers is built in, and
the ways our kernel differs are the known ones: ours finds its devices through ACPI as Firecracker's
guests do, and also on the command line, which Firecracker deprecates for 2.0 (docs/firecracker.md)."""

from __future__ import annotations

from pathlib import Path

from agentkernel.artifacts.kernel import config_fragment, wanted_symbols

REFERENCE = Path(__file__).with_name("microvm-kernel-ci-x86_64-6.1.config")

FIRECRACKER_NEEDS = (
    "CONFIG_KVM_GUEST",  # kvm-clock
    "CONFIG_PVH",
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_NET",
    "CONFIG_VIRTIO_VSOCKETS",
    "CONFIG_HW_RANDOM_VIRTIO",  # /entropy
    "CONFIG_VIRTIO_BALLOON",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_EXT4_FS",
)
DIFFERENCES = {
    # Devices from ACPI tables (QEMU acpi=on, Firecracker 2.0) and from the command line (QEMU acpi=off,
    # Firecracker 1.x), CPUs also from the MP table (acpi=off has no MADT).
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": ("y", None),
    "CONFIG_X86_MPPARSE": ("y", None),
}


def reference() -> dict[str, str]:
    return wanted_symbols(REFERENCE.read_text())


def test_what_firecracker_guests_need_is_built_in() -> None:
    ours, theirs = wanted_symbols(config_fragment()), reference()
    for name in FIRECRACKER_NEEDS:
        assert theirs.get(name) == "y", f"{name} is no longer in Firecracker's guest config"
        assert ours.get(name) == "y", f"{name} is not in our guest kernel config"


def test_the_differences_are_the_known_ones() -> None:
    ours, theirs = wanted_symbols(config_fragment()), reference()
    for name, (mine, firecrackers) in DIFFERENCES.items():
        assert ours.get(name) == mine, name
        assert theirs.get(name) == firecrackers, name
