"""The container backend's configuration without an engine: seccomp profiles, flags, id mapping."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.container import backend as container
from agentkernel.backends.container import seccomp
from agentkernel.config import MAX_PROCS

ENGINE = container.Engine("podman", "/usr/bin/podman", "4.3.1", ("--runtime", "/usr/sbin/runc"), 20000)


@pytest.mark.parametrize("name", seccomp.PROFILES)
def test_shipped_profiles_are_current(name: str) -> None:
    assert seccomp.asset_path(name).read_text() == seccomp.render(name), (
        "run `python -m agentkernel.backends.container.seccomp` to regenerate the seccomp profiles"
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
    spec = VMSpec(
        "box", Path("/k"), Path("/i"), tmp_path / "w", tmp_path / "r", vcpus=2, memory_mb=300,
        max_procs=MAX_PROCS[profile],
    )  # fmt: skip
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


def test_root_of_a_rootful_container_is_an_unprivileged_host_range(tmp_path: Path) -> None:
    spec = VMSpec("box", Path("/k"), Path("/i"), tmp_path / "w", tmp_path / "r")
    mapped = dataclasses.replace(ENGINE, userns=(700000000, 700100000))
    cmd = container.create_command(mapped, spec, "moderate", ["--rootfs", "/tree:O"])
    text = " ".join(cmd)
    assert "--uidmap 0:700000000:65536" in text and "--gidmap 0:700100000:65536" in text
    assert "--uidmap" not in container.create_command(ENGINE, spec, "moderate", [])  # rootless: its own
    assert "host uid 700000000" in mapped.describe()


@pytest.mark.parametrize(
    ("subuid", "subgid", "expected"),
    [
        ("root:700000000:65536\n", "root:700000000:65536\n", (700000000, 700000000)),
        ("alice:100000:65536\n0:200000:70000\n", "root:300000:65536\n", (200000, 300000)),
        ("root:100000:1000\nroot:400000:65536\n", "root:100000:65536\n", (400000, 100000)),
        ("root:0:65536\n", "root:100000:65536\n", None),  # never host root itself
        ("alice:100000:65536\n", "root:100000:65536\n", None),
        ("root:100000:65536\n", None, None),
    ],
)
def test_root_userns_from_subordinate_ids(
    subuid: str,
    subgid: str | None,
    expected: tuple[int, int] | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "subuid").write_text(subuid)
    if subgid is not None:
        (tmp_path / "subgid").write_text(subgid)
    monkeypatch.setattr(container, "SUBUID", tmp_path / "subuid")
    monkeypatch.setattr(container, "SUBGID", tmp_path / "subgid")
    assert container.root_userns() == expected


@pytest.mark.parametrize(
    ("options", "used"),
    [
        ('["name=apparmor","name=seccomp,profile=builtin","name=cgroupns"] Debian GNU/Linux 12', False),
        ('["name=seccomp,profile=builtin","name=userns"] Debian GNU/Linux 12', True),  # userns-remap
        ('["name=seccomp,profile=builtin","name=rootless"] Ubuntu 24.04 LTS', True),
        ('["name=seccomp,profile=builtin","name=cgroupns"] Docker Desktop', True),  # in its own VM
    ],
)
def test_docker_only_when_its_daemon_maps_ids(options: str, used: bool, tmp_path: Path) -> None:
    """No Docker daemon runs here: a stand-in answers `docker info` as one would."""
    docker = tmp_path / "docker"
    docker.write_text(f"#!/bin/sh\n[ \"$1\" = info ] && echo '{options}'\n")
    docker.chmod(0o755)
    assert container._docker_maps_ids(str(docker)) is used


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("podman") is None, reason="needs root and podman")
def test_rootful_podman_without_a_range_for_root_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "subuid").write_text("alice:100000:65536\n")
    monkeypatch.setattr(container, "SUBUID", tmp_path / "subuid")
    reasons: list[str] = []
    assert [e for e in container._candidates(reasons) if e.kind == "podman"] == []
    assert any("give root no range of 65536 ids" in reason for reason in reasons)
