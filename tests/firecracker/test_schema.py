"""Every request body the backend sends, checked against Firecracker's API spec (firecracker.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel.backends.firecracker import backend as fc
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
    requests = [("PUT", path, body) for path, body in fc.config_requests(vm, layout)]
    requests += [("PUT", "/actions", fc.action_body(a)) for a in ("InstanceStart", "SendCtrlAltDel")]
    requests += [("PATCH", "/vm", fc.vm_state_body(state)) for state in ("Paused", "Resumed")]
    requests += [("PUT", "/snapshot/create", fc.snapshot_create_body("/s/vmstate", "/s/memory"))]
    restore = make_spec(
        vcpus=vcpus, memory_mb=memory_mb, read_only=read_only, egress=vm.egress, restore=Path("/s")
    )
    restore_puts = fc.config_requests(restore, layout)
    load = fc.snapshot_load_body(restore, *fc.restore_files(restore, jailed=jailed))
    requests += [("PUT", path, body) for path, body in restore_puts] + [("PUT", "/snapshot/load", load)]
    for method, path, body in requests:
        assert spec.body_errors(method, path, body) == [], path
        assert {204, "default"} <= spec.response_codes(method, path)  # success, and errors as Error
    sent = {path: body for method, path, body in requests if method == "PUT"}
    assert ("/network-interfaces/eth0" in sent) is network
    assert sent["/drives/rootfs"]["is_read_only"] is read_only
    assert sent["/machine-config"] == {"vcpu_count": vcpus, "mem_size_mib": memory_mb, "smt": False}
    assert [path for path, _ in restore_puts] == ["/logger", "/metrics"]  # all a load allows before it
    assert load["mem_backend"]["backend_type"] == "File" and load["resume_vm"] is True
    assert load["vsock_override"] == {"uds_path": str(restore.rundir / "v.sock")}
    assert load.get("network_overrides") == (
        [{"iface_id": "eth0", "host_dev_name": "tap0"}] if network else None
    )


def test_the_validation_is_strict(make_spec: MakeSpec) -> None:
    """The checks above would catch a wrong body: out of range, misspelt, missing, mismatched."""
    assert spec.body_errors("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128})
    assert spec.body_errors("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128})
    assert spec.body_errors("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mb": 128})
    assert spec.body_errors("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v.sock"})
    assert spec.body_errors("PUT", "/drives/rootfs", {"drive_id": "other", "is_root_device": True})
    assert spec.body_errors("PUT", "/actions", {"action_type": "Reboot"})
    assert spec.body_errors("PUT", "/boot-source", {"boot_args": "console=ttyS0"})
    assert spec.body_errors("PATCH", "/vm", {"state": "Stopped"})
    assert spec.body_errors("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": "/s"})
    assert spec.body_errors(
        "PUT", "/snapshot/create", {**fc.snapshot_create_body("/a", "/b"), "type": "Full"}
    )
    load = fc.snapshot_load_body(make_spec(restore=Path("/s")), "/s/vmstate", "/s/memory")
    assert spec.body_errors("PUT", "/snapshot/load", {**load, "mem_backend": {"backend_type": "File"}})
    assert spec.body_errors("PUT", "/snapshot/load", {**load, "vsock_override": {"path": "/v.sock"}})
    assert spec.body_errors("PUT", "/snapshot/load", {**load, "network_overrides": [{"iface_id": "eth0"}]})
    with pytest.raises(KeyError):
        spec.operation("PUT", "/no-such-resource")


def test_a_restore_cannot_move_a_drive() -> None:
    """Why the drive's path is relative (firecracker.disk_link): a load can be told another vsock
    socket and other taps, but no other drive file; and PATCH /drives is post-boot only, after the
    load has opened the drive at the recorded path."""
    load = spec.load()["definitions"]["SnapshotLoadParams"]["properties"]
    assert {"vsock_override", "network_overrides"} <= set(load)
    assert not [name for name in load if "drive" in name or "block" in name]
    assert "Post-boot only" in spec.operation("PATCH", "/drives/rootfs")[1]["summary"]


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
    assert sent["/vsock"] == {"guest_cid": 3, "uds_path": str(vm.rundir / "v.sock")}
    assert sent["/logger"]["log_path"] == str(vm.workdir / "firecracker.log")
    assert sent["/metrics"] == {"metrics_path": str(vm.workdir / "metrics.json")}
    # The drive is relative: the run directory's link (the sandbox's copy, or the immutable image for
    # a read-only root), or the jail's root; a snapshot then restores with each fork's own disk.
    jailed = dict(fc.config_requests(vm, fc.JAIL_LAYOUT))
    assert sent["/drives/rootfs"]["path_on_host"] == jailed["/drives/rootfs"]["path_on_host"] == "rootfs.ext4"
    assert fc.disk_link(vm) == vm.rundir / "rootfs.ext4" and fc.disk(vm) == vm.workdir / "rootfs.ext4"
    assert fc.disk(make_spec(read_only=True)) == files[1]
    assert jailed["/boot-source"]["kernel_image_path"] == "/vmlinux"
    assert jailed["/vsock"]["uds_path"] == str(vm.rundir / "v.sock")  # the jail mirrors the run dir
    restore = make_spec(restore=Path("snapshots/s"))  # relative: made absolute for firecracker
    assert fc.restore_files(restore, jailed=False) == (
        str(Path.cwd() / "snapshots/s/vmstate"),
        str(Path.cwd() / "snapshots/s/memory"),
    )
    assert fc.restore_files(restore, jailed=True) == ("/restore.vmstate", "/restore.memory")
