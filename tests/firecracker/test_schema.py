"""Every request body the backend sends, checked against Firecracker's API spec (firecracker.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel.backends import firecracker as fc
from agentkernel.network.policy import EgressRules
from tests.firecracker import spec
from tests.firecracker.conftest import MakeSpec

NETWORK = EgressRules(allow=("pypi.org",), block=(), allowlist_only=False)


@pytest.mark.parametrize("network", [False, True], ids=["no-network", "network"])
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize(("vcpus", "memory_mb"), [(1, 64), (2, 512), (32, 65536)])
@pytest.mark.parametrize("jailed", [False, True], ids=["direct", "jailed"])
def test_every_body_matches_the_spec(
    make_spec: MakeSpec, network: bool, read_only: bool, vcpus: int, memory_mb: int, jailed: bool
) -> None:
    vm = make_spec(vcpus=vcpus, memory_mb=memory_mb, read_only=read_only, egress=NETWORK if network else None)
    layout = fc.JAIL_LAYOUT if jailed else fc.host_layout(vm)
    requests = [*fc.config_requests(vm, layout)]
    requests += [("/actions", fc.action_body(a)) for a in ("InstanceStart", "SendCtrlAltDel")]
    for path, body in requests:
        assert spec.body_errors("PUT", path, body) == [], path
        assert {204, "default"} <= spec.response_codes("PUT", path)  # success, and errors as Error
    sent = dict(requests)
    assert ("/network-interfaces/eth0" in sent) is network
    assert sent["/drives/rootfs"]["is_read_only"] is read_only
    assert sent["/machine-config"] == {"vcpu_count": vcpus, "mem_size_mib": memory_mb, "smt": False}


def test_the_validation_is_strict(make_spec: MakeSpec) -> None:
    """The checks above would catch a wrong body: out of range, misspelt, missing, mismatched."""
    assert spec.body_errors("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128})
    assert spec.body_errors("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128})
    assert spec.body_errors("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mb": 128})
    assert spec.body_errors("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v.sock"})
    assert spec.body_errors("PUT", "/drives/rootfs", {"drive_id": "other", "is_root_device": True})
    assert spec.body_errors("PUT", "/actions", {"action_type": "Reboot"})
    assert spec.body_errors("PUT", "/boot-source", {"boot_args": "console=ttyS0"})
    with pytest.raises(KeyError):
        spec.operation("PUT", "/no-such-resource")


def test_kernel_command_line(make_spec: MakeSpec) -> None:
    plain = fc.kernel_cmdline(make_spec())
    assert plain == (
        "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw rootfstype=ext4 quiet "
        "init=/sbin/agentkernel-agent"
    )
    assert " ro " in fc.kernel_cmdline(make_spec(read_only=True))
    assert fc.kernel_cmdline(make_spec(egress=NETWORK)).endswith(
        " ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
    )


def test_paths_firecracker_is_given(make_spec: MakeSpec, files: tuple[Path, Path]) -> None:
    vm = make_spec()
    sent = dict(fc.config_requests(vm, fc.host_layout(vm)))
    assert sent["/boot-source"]["kernel_image_path"] == str(files[0])
    assert sent["/drives/rootfs"]["path_on_host"] == str(vm.workdir / "rootfs.ext4")
    assert sent["/vsock"] == {"guest_cid": 3, "uds_path": str(vm.rundir / "v.sock")}
    assert sent["/logger"]["log_path"] == str(vm.workdir / "firecracker.log")
    assert sent["/metrics"] == {"metrics_path": str(vm.workdir / "metrics.json")}
    read_only = make_spec(read_only=True)
    assert dict(fc.config_requests(read_only, fc.host_layout(read_only)))["/drives/rootfs"][
        "path_on_host"
    ] == str(files[1])  # the immutable image itself, opened read-only
    jailed = dict(fc.config_requests(vm, fc.JAIL_LAYOUT))
    assert jailed["/boot-source"]["kernel_image_path"] == "/vmlinux"
    assert jailed["/vsock"]["uds_path"] == str(vm.rundir / "v.sock")  # the jail mirrors the run dir
