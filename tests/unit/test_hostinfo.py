from pathlib import Path

from agentkernel.hostinfo import detect_accel

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
