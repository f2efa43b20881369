"""Firecracker releases: the version floor, the version read once per binary, snapshots tied to the
release that took them (metadata, pool key, forks refused across releases) and `agentkernel status`,
with the fake firecracker, which prints its release as Firecracker does (`--version`: first line
"Firecracker vX.Y.Z") and refuses what its release would (fake_firecracker.py)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from agentkernel import hostinfo
from agentkernel.backends import registry
from agentkernel.backends.firecracker import version as fv
from agentkernel.backends.firecracker.api import FirecrackerAPI
from agentkernel.backends.firecracker.backend import FirecrackerBackend
from agentkernel.backends.registry import BackendStatus
from agentkernel.config import PROFILES
from agentkernel.errors import AgentkernelError, FirecrackerAPIError
from agentkernel.sandbox import state
from agentkernel.service import sandboxes, snapshots
from tests.conftest import cli
from tests.firecracker.conftest import KVM, NO_NETWORK, Fake, MakeSpec
from tests.firecracker.test_snapshots import MEMORY_MB, run, started


@pytest.mark.parametrize("release", ["1.15.2", "1.16.0"])
def test_releases_before_the_floor_are_refused_in_one_line(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, release: str
) -> None:
    fake.set_version(release)
    for step in (backend.prepare, backend.start):
        with pytest.raises(AgentkernelError) as info:
            step(make_spec())
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{fake.bin / 'firecracker'} is Firecracker {release}; ")
        assert "the firecracker backend needs 1.16.1 or newer" in message
    assert fake.api_calls() == []  # refused before anything ran


@pytest.mark.parametrize("release", ["1.16.1", "1.17.0-dev", "2.0.0"])
def test_releases_from_the_floor_run(
    backend: FirecrackerBackend, make_spec: MakeSpec, fake: Fake, release: str
) -> None:
    fake.set_version(release)
    vm = make_spec()
    pid = started(backend, vm)
    assert backend.running_version(vm, pid) == release
    backend.kill(vm, pid)


def test_an_unreadable_version_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "firecracker"
    binary.write_text("#!/bin/sh\necho 'something else'\n")
    binary.chmod(0o755)
    with pytest.raises(AgentkernelError) as info:
        fv.version(str(binary))
    assert str(info.value) == (
        f"cannot tell the version of {binary}: `--version` printed 'something else', not 'Firecracker vX.Y.Z'"
    )


def test_the_version_is_read_once_per_binary(tmp_path: Path) -> None:
    """Every start and every pool key asks; the binary runs again only when its file changes."""
    runs = tmp_path / "runs"
    binary = tmp_path / "firecracker"

    def install(release: str) -> None:
        new = tmp_path / "new"
        new.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'Firecracker v{release}'\necho\n")
        new.chmod(0o755)
        new.replace(binary)  # an upgrade: a new file

    install("1.16.1")
    assert [fv.version(str(binary)) for _ in range(5)] == ["1.16.1"] * 5
    assert runs.read_text().count("run") == 1
    install("1.16.2")
    assert fv.version(str(binary)) == "1.16.2" and fv.version(str(binary)) == "1.16.2"
    assert runs.read_text().count("run") == 2


@pytest.mark.parametrize(
    ("release", "answer"),
    [("1.15.2", "unknown field `vsock_override`"), ("1.16.0", "cannot read the snapshot files")],
)
def test_the_stand_in_knows_vsock_override_from_1_16(
    fake: Fake, tmp_path: Path, release: str, answer: str
) -> None:
    """Why the floor: before 1.16.0 Firecracker refuses the field every fork sends (a body it
    takes fails later, here for want of snapshot files)."""
    fake.set_version(release)
    sock = tmp_path / "fc.sock"
    proc = subprocess.Popen([str(fake.bin / "firecracker"), "--api-sock", str(sock)])
    try:
        with FirecrackerAPI(sock) as api:
            deadline = time.monotonic() + 30
            while not api.ready() and time.monotonic() < deadline:
                time.sleep(0.01)
            body = {
                "snapshot_path": str(tmp_path / "vmstate"),
                "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "memory")},
                "vsock_override": {"uds_path": str(tmp_path / "v.sock")},
                "resume_vm": True,
            }
            with pytest.raises(FirecrackerAPIError, match=answer):
                api.put("/snapshot/load", body)
    finally:
        proc.kill()
        proc.wait()


def test_snapshots_are_tied_to_the_release_that_took_them(service: Path, fake: Fake) -> None:
    sandboxes.create("origin", backend="firecracker", policy=NO_NETWORK, memory_mb=MEMORY_MB)
    run(sandboxes.start("origin"))
    fake.set_version("1.16.2")  # upgraded while origin runs: its process is still the old release
    snap = run(snapshots.create("origin", "snap"))
    assert snap.meta["firecracker_version"] == "1.16.1"
    assert json.loads((snap.path / "snapshot.json").read_text())["firecracker_version"] == "1.16.1"
    with pytest.raises(AgentkernelError) as info:
        run(snapshots.fork("snap", "fork"))
    assert str(info.value) == (
        "snapshot 'snap' was taken with Firecracker 1.16.1 and this host runs 1.16.2: Firecracker "
        "resumes snapshots only on the release that took them; take a new snapshot"
    )
    assert "fork" not in [record.name for record in state.all_records()]
    fake.set_version("1.16.1")
    assert run(snapshots.fork("snap", "fork")).status == "running"


def test_the_pool_key_holds_the_release(service: Path, fake: Fake) -> None:
    """A pool's template is a snapshot: another release makes another key, so a new template."""
    policy = PROFILES["moderate"]

    def key(backend: str | None) -> str | None:
        return sandboxes.pool_key(image="base", backend=backend, vcpus=1, memory_mb=256, policy=policy)

    before = {backend: key(backend) for backend in (None, "firecracker", "qemu")}
    fake.set_version("1.17.0")
    after = {backend: key(backend) for backend in (None, "firecracker", "qemu")}
    assert after[None] != before[None] and after["firecracker"] != before["firecracker"]
    assert after["qemu"] == before["qemu"]


def test_a_release_before_the_floor_is_not_offered(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    """With KVM and a firecracker too old to run sandboxes, selection passes it over, saying why."""
    monkeypatch.setattr(hostinfo, "accel", lambda: KVM)
    assert registry.info("firecracker").probe() == BackendStatus(
        True, f"{fake.bin / 'firecracker'} (Firecracker 1.16.1) with KVM"
    )
    fake.set_version("1.15.2")
    found = registry.info("firecracker").probe()
    assert not found.available
    assert found.reason.startswith(f"{fake.bin / 'firecracker'} is Firecracker 1.15.2; ")
    assert hostinfo.choose_backend(None, needs_network=False) != "firecracker"


def test_status_shows_the_release(fake: Fake, isolated_home: Path) -> None:
    done = cli("status")
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.decode().splitlines() if line.startswith("firecracker:"))
    assert line == f"firecracker: Firecracker 1.16.1 ({fake.bin / 'firecracker'})"
    fake.set_version("1.15.2")
    done = cli("status")
    assert f"firecracker: {fake.bin / 'firecracker'} is Firecracker 1.15.2; " in done.stdout.decode()
    done = cli("status", "--json")
    info = json.loads(done.stdout)["firecracker"]
    assert info["version"] == "1.15.2" and re.search(r"needs 1\.16\.1 or newer", info["problem"])
