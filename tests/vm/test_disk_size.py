"""`[resources] disk_mb`: the size of a sandbox's writable disk, with real QEMU VMs; the guest's `df`
shows it, also in a copy resumed from a snapshot once its source is gone."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest

from agentkernel.backends.base import VMSpec
from agentkernel.backends.container.backend import ContainerBackend
from agentkernel.backends.qemu.backend import QemuBackend
from agentkernel.errors import AgentkernelError
from agentkernel.protocol.connection import Connection
from tests.vm.conftest import Artifacts, run_async

pytestmark = pytest.mark.vm


def spec_in(tmp_path: Path, artifacts: Artifacts, name: str, **fields: object) -> VMSpec:
    rundir = Path(tempfile.mkdtemp(prefix="akvm-"))  # short: Unix socket paths are limited
    return VMSpec(name, artifacts.kernel, artifacts.base_image, tmp_path / name, rundir, **fields)  # type: ignore[arg-type]


async def root_mib(conn: Connection) -> int:
    """The size of the guest's root filesystem in MiB, as its `df` reports it."""
    done = await conn.run(["sh", "-c", "df -Pk / | tail -n 1"])
    return int(done.stdout.split()[1]) // 1024


def boot(backend: QemuBackend, spec: VMSpec) -> int:
    backend.prepare(spec)
    return backend.start(spec)


def test_disk_mb_sizes_the_writable_disk(artifacts: Artifacts, tmp_path: Path) -> None:
    backend = QemuBackend()
    plain = spec_in(tmp_path, artifacts, "plain")
    big = spec_in(tmp_path, artifacts, "big", disk_mb=1024)
    snap = tmp_path / "snap"
    snap.mkdir()
    copy = dataclasses.replace(
        spec_in(tmp_path, artifacts, "copy"), image=snap / "disk.qcow2", image_format="qcow2", restore=snap
    )
    pids: dict[str, int] = {}

    async def body() -> None:
        pids["plain"] = boot(backend, plain)
        conn = await backend.connect(plain, pids["plain"], timeout=60)
        image_mib = await root_mib(conn)
        await conn.close()
        assert image_mib < 800  # the image's own filesystem: the sizes below are not its own

        pids["big"] = boot(backend, big)
        conn = await backend.connect(big, pids["big"], timeout=60)
        assert 900 <= await root_mib(conn) <= 1024  # ext4 keeps some for its journal and inodes
        done = await conn.run(["sh", "-c", "fallocate -l 700M /root/fill && echo kept > /root/f && sync"])
        assert done.status.exit_code == 0, done.stderr
        await conn.close()

        # A snapshot's disk stands on the image alone: a copy resumes from it once the source is gone.
        await backend.snapshot(big, pids["big"], snap)
        backend.kill(big, pids.pop("big"))
        backend.cleanup(big, keep_disk=False)
        pids["copy"] = boot(backend, copy)
        await backend.resume(copy, pids["copy"])
        conn = await backend.connect(copy, pids["copy"], timeout=60)
        assert (await conn.run(["cat", "/root/f"])).stdout == b"kept\n"
        assert 900 <= await root_mib(conn) <= 1024
        await conn.close()

    try:
        run_async(body())
    finally:
        for spec in (plain, big, copy):
            backend.kill(spec, pids.get(spec.name))
            backend.cleanup(spec, keep_disk=False)


def test_a_disk_smaller_than_the_image_is_refused(artifacts: Artifacts, tmp_path: Path) -> None:
    spec = spec_in(tmp_path, artifacts, "small", disk_mb=100)
    with pytest.raises(AgentkernelError) as info:
        QemuBackend().prepare(spec)
    message = str(info.value)
    assert message.startswith("cannot create the sandbox disk: disk_mb 100 is less than its image's ")
    assert message.endswith(" MiB")
    assert not (spec.workdir / "disk.qcow2").exists()


def test_a_read_only_root_keeps_the_image(artifacts: Artifacts, tmp_path: Path) -> None:
    """A read-only root has no writable disk to size (its writes go to a tmpfs): disk_mb is not refused."""
    spec = spec_in(tmp_path, artifacts, "ro", disk_mb=100, read_only=True)
    QemuBackend().prepare(spec)
    assert not (spec.workdir / "grown.qcow2").exists()


def test_the_container_backend_refuses_a_disk_size(artifacts: Artifacts, tmp_path: Path) -> None:
    spec = spec_in(tmp_path, artifacts, "box", disk_mb=1024, egress=None)
    with pytest.raises(
        AgentkernelError, match=r"^the container backend cannot size a sandbox's disk .*disk_mb"
    ):
        ContainerBackend(engine=None).prepare(spec)
