"""One guest kernel, two ways to find its devices: QEMU microvm with acpi=off (virtio-mmio devices on
the kernel command line, how sandboxes boot) and with acpi=on (devices in the ACPI DSDT only, as
Firecracker 2.0 gives them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.artifacts import kernel
from agentkernel.backends.base import VMSpec
from agentkernel.backends.qemu import tsc
from agentkernel.backends.qemu.backend import command
from agentkernel.errors import AgentkernelError
from agentkernel.hostinfo import Accel
from tests.vm.conftest import Artifacts, BootedVM, boot, connected, run_async

pytestmark = pytest.mark.vm


# What an ACPI boot needs of the kernel, whatever microvm.config held when the cached one was built.
ACPI_BUILD = "CONFIG_ACPI=y\nCONFIG_PCI=y\n"


@pytest.fixture
def current_kernel(artifacts: Artifacts) -> Path:
    """The cached kernel, if it was built with today's microvm.config and with ACPI."""
    built = artifacts.kernel.with_name("config")
    config = built.read_text() if built.exists() else ""
    if missing := kernel.missing_symbols(kernel.config_fragment() + ACPI_BUILD, config):
        pytest.skip(
            f"the cached guest kernel lacks {', '.join(missing[:4])}: it predates microvm.config, or "
            "microvm.config does not enable ACPI; rebuild it with `agentkernel setup`"
        )
    return artifacts.kernel


@pytest.fixture
def acpi_vm(current_kernel: Path, artifacts: Artifacts, tmp_path: Path) -> Iterator[BootedVM]:
    yield from boot(current_kernel, artifacts.base_image, tmp_path / "vm", acpi=True)


@pytest.fixture
def legacy_vm(current_kernel: Path, artifacts: Artifacts, tmp_path: Path) -> Iterator[BootedVM]:
    yield from boot(current_kernel, artifacts.base_image, tmp_path / "vm", acpi=False)


async def guest_text(vm: BootedVM, script: str) -> str:
    async with connected(vm) as conn:
        done = await conn.run(["sh", "-c", script])
        assert done.status.exit_code == 0, done.stderr
        return done.stdout.decode()


def test_devices_found_through_acpi_alone(acpi_vm: BootedVM) -> None:
    """No virtio_mmio.device= on the command line: the disk, the agent's serial ports and the RNG are
    the DSDT's LNRO0005 devices, and the agent runs from the root disk found that way."""

    async def body() -> None:
        cmdline = await guest_text(acpi_vm, "cat /proc/cmdline")
        assert "virtio_mmio.device=" not in cmdline
        found = await guest_text(
            acpi_vm, "for d in /sys/bus/virtio/devices/*; do readlink -f $d; cat $d/device; done"
        )
        parents = [line for line in found.splitlines() if line.startswith("/sys")]
        assert len(parents) >= 3, found  # block, console (agent ports), rng
        assert all("/LNRO0005:" in parent for parent in parents), found
        kinds = {int(line, 16) for line in found.splitlines() if line.startswith("0x")}
        assert {2, 3, 4} <= kinds, found  # virtio ids: block, console, entropy
        assert "/LNRO0005:" in await guest_text(acpi_vm, "readlink -f /sys/block/vda/device")  # the root disk

    run_async(body())


def test_the_same_kernel_still_boots_from_the_command_line(legacy_vm: BootedVM) -> None:
    """acpi=off, how every sandbox boots: no ACPI tables, devices from the command line."""

    async def body() -> None:
        assert "virtio_mmio.device=" in await guest_text(legacy_vm, "cat /proc/cmdline")
        assert await guest_text(legacy_vm, "ls /sys/bus/acpi/devices 2>/dev/null | wc -l") == "0\n"
        disk = await guest_text(legacy_vm, "readlink -f /sys/block/vda/device")
        assert "/virtio-mmio-cmdline/" in disk, disk

    run_async(body())


def test_acpi_under_tcg_needs_a_tsc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host without a usable TSC (not x86, or an unstable one: cannot exist here) is refused in one
    line rather than booting a guest that would hang calibrating its timer."""
    monkeypatch.setattr(tsc, "host_khz", lambda: None)
    spec = VMSpec("acpivm", tmp_path / "vmlinux", tmp_path / "image", workdir=tmp_path, rundir=tmp_path)
    assert "acpi=off" in " ".join(command(spec, Accel("tcg", "")))  # sandboxes boot on without a TSC
    with pytest.raises(AgentkernelError, match=r"^cannot boot with ACPI under TCG: this host has no TSC"):
        command(spec, Accel("tcg", ""), acpi=True)
