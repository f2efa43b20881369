"""The container backend's configuration without an engine: seccomp profiles, flags, backend choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkernel.backends import container, seccomp
from agentkernel.backends.base import VMSpec
from agentkernel.config import MAX_PROCS
from agentkernel.hostinfo import Accel, BackendStatus, choose_backend

ENGINE = container.Engine("podman", "/usr/bin/podman", "4.3.1", ("--runtime", "/usr/sbin/runc"), 20000)


@pytest.mark.parametrize("name", seccomp.PROFILES)
def test_shipped_profiles_are_current(name: str) -> None:
    assert seccomp.asset_path(name).read_text() == seccomp.render(name), (
        "run `python -m agentkernel.backends.seccomp` to regenerate the seccomp profiles"
    )


def allowed(name: str) -> set[str]:
    profile = json.loads(seccomp.asset_path(name).read_text())
    return {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]}


def test_profiles_deny_by_default_and_nest() -> None:
    for name in seccomp.PROFILES:
        profile = json.loads(seccomp.asset_path(name).read_text())
        assert (profile["defaultAction"], profile["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    assert allowed("restrictive") < allowed("moderate") < allowed("permissive")
    never = {
        "bpf",
        "kexec_load",
        "init_module",
        "keyctl",
        "add_key",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "open_by_handle_at",
        "reboot",
        "sethostname",
        "clock_settime",
        "swapon",
    }
    assert not never & allowed("permissive")
    assert not {"unshare", "mount", "setns", "pivot_root"} & allowed("moderate")
    assert not {"ptrace", "process_vm_readv", "socketcall"} & allowed("restrictive")


def test_clone_cannot_make_namespaces_outside_permissive() -> None:
    for name in ("moderate", "restrictive"):
        rules = json.loads(seccomp.asset_path(name).read_text())["syscalls"]
        clone = [r for r in rules if r["names"] == ["clone"]]
        masked = {"index": 0, "value": seccomp.CLONE_NAMESPACES, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
        assert clone == [{"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [masked]}]
        assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in rules


@pytest.mark.parametrize("profile", seccomp.PROFILES)
def test_every_container_is_hardened(profile: str, tmp_path: Path) -> None:
    spec = VMSpec("box", Path("/k"), Path("/i"), tmp_path / "w", tmp_path / "r", vcpus=2, memory_mb=300)
    cmd = container.create_command(ENGINE, spec, profile, ["--rootfs", "/tree:O"])
    text = " ".join(cmd)
    assert cmd[:3] == ["/usr/bin/podman", "--runtime", "/usr/sbin/runc"]
    assert cmd[-1] == container.AGENT_PATH and "--init" not in cmd and "--rm" not in cmd
    for flag in ("--cap-drop=ALL", "--security-opt no-new-privileges", "--network none", "--cpus 2",
                 "--memory 300m", "--memory-swap 300m", f"--pids-limit {MAX_PROCS[profile]}",
                 "--tmpfs /tmp:", "--tmpfs /run:", f"seccomp={seccomp.asset_path(profile)}",
                 f"AGENTKERNEL_LISTEN={container.GUEST_RUNDIR}/agent.sock",
                 f"{spec.rundir}:{container.GUEST_RUNDIR}:rw"):  # fmt: skip
        assert flag in text, flag
    adds = sorted(a.removeprefix("--cap-add=") for a in cmd if a.startswith("--cap-add="))
    assert adds == sorted(container.CAPS[profile])
    assert "--read-only" not in cmd  # the policy's: its own copy-on-write layer
    read_only = container.create_command(ENGINE, VMSpec(**{**spec.__dict__, "read_only": True}), profile, [])
    assert "--read-only" in read_only


STATUS_OK, STATUS_NO = BackendStatus(True, "ok"), BackendStatus(False, "missing")
KVM, TCG = Accel("kvm", ""), Accel("tcg", "no vmx")


@pytest.mark.parametrize(
    ("accel", "firecracker", "qemu", "engine", "expected"),
    [
        (KVM, STATUS_OK, STATUS_OK, STATUS_OK, "firecracker"),
        (KVM, STATUS_NO, STATUS_OK, STATUS_OK, "qemu"),
        (TCG, STATUS_NO, STATUS_OK, STATUS_OK, "container"),
        (TCG, STATUS_OK, STATUS_OK, STATUS_OK, "container"),  # firecracker needs hardware KVM
        (TCG, STATUS_NO, STATUS_OK, STATUS_NO, "qemu"),
        (KVM, STATUS_NO, STATUS_NO, STATUS_OK, "container"),
    ],
)
def test_choose_backend(
    accel: Accel, firecracker: BackendStatus, qemu: BackendStatus, engine: BackendStatus, expected: str
) -> None:
    statuses = {"firecracker": firecracker, "qemu": qemu, "container": engine}
    assert choose_backend(statuses, accel) == expected


def test_choose_backend_with_nothing_usable() -> None:
    from agentkernel.errors import AgentkernelError

    with pytest.raises(AgentkernelError, match="no backend can run sandboxes here: qemu: missing"):
        choose_backend({"qemu": STATUS_NO, "container": STATUS_NO}, TCG)
