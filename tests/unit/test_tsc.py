"""The host TSC rate TCG guests are told, and the check that a snapshot resumes only at its rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.qemu import backend as qemu
from agentkernel.backends.qemu import tsc
from agentkernel.errors import AgentkernelError


def spec_resuming(snapshot: Path) -> VMSpec:
    return VMSpec("t", Path("vmlinux"), Path("disk"), workdir=snapshot, rundir=snapshot, restore=snapshot)


@pytest.fixture
def host_khz() -> int:
    khz = tsc.host_khz()
    if khz is None:
        pytest.skip("this host does not keep time by its TSC: guests get none")
    return khz


def test_measured_rate_is_steady(host_khz: int) -> None:
    for _ in range(3):
        measured = tsc.measure()
        assert measured is not None
        assert abs(measured - host_khz) * 10_000 < host_khz  # within 0.01 %


def test_snapshot_without_machine_file_resumes_without_tsc(tmp_path: Path) -> None:
    assert qemu.guest_tsc_khz(spec_resuming(tmp_path)) is None
    assert "max,-tsc,-rdtscp" in qemu.command(spec_resuming(tmp_path), qemu.Accel("tcg", "test"))


def test_snapshot_resumes_at_its_own_rate(tmp_path: Path, host_khz: int) -> None:
    (tmp_path / qemu.MACHINE_FILE).write_text(json.dumps({"tsc_khz": host_khz + 5}))  # measured anew
    assert qemu.guest_tsc_khz(spec_resuming(tmp_path)) == host_khz + 5
    cmd = qemu.command(spec_resuming(tmp_path), qemu.Accel("tcg", "test"))
    assert cmd[cmd.index("-cpu") + 1] == "max"
    assert "rtc=on" in cmd[cmd.index("-M") + 1]


def test_snapshot_from_a_host_with_another_tsc_rate_is_refused(tmp_path: Path, host_khz: int) -> None:
    (tmp_path / qemu.MACHINE_FILE).write_text(json.dumps({"tsc_khz": host_khz * 2}))
    with pytest.raises(AgentkernelError, match=r"TSC runs at .* take a new snapshot on this host"):
        qemu.guest_tsc_khz(spec_resuming(tmp_path))


def test_unreadable_machine_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / qemu.MACHINE_FILE).write_text("{not json")
    with pytest.raises(AgentkernelError, match=f"cannot read the snapshot's {qemu.MACHINE_FILE}"):
        qemu.guest_tsc_khz(spec_resuming(tmp_path))


@pytest.mark.parametrize(
    "machine", ['{"tsc_khz": "fast"}', '{"tsc_khz": 1.5}', '{"tsc_khz": true}', "[1]", "7", "{}"]
)
def test_a_machine_file_of_the_wrong_shape_is_one_clear_error(tmp_path: Path, machine: str) -> None:
    (tmp_path / qemu.MACHINE_FILE).write_text(machine)
    with pytest.raises(AgentkernelError, match=f"cannot read the snapshot's {qemu.MACHINE_FILE}: not an"):
        qemu.guest_tsc_khz(spec_resuming(tmp_path))
