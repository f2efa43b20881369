"""Fixtures for tests that boot real microVMs with the artifacts `agentkernel setup` built."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.artifacts import kernel
from agentkernel.backends.base import VMSpec
from agentkernel.backends.qemu.backend import QemuBackend
from agentkernel.images import store
from agentkernel.protocol.connection import Connection
from tests.conftest import cli


@dataclass(frozen=True)
class Artifacts:
    kernel: Path
    base_image: Path


@pytest.fixture(scope="session")
def artifacts() -> Artifacts:
    vmlinux = kernel.current()
    if vmlinux is None:
        pytest.fail("no guest kernel: run `agentkernel setup` first (install.sh does)")
    return Artifacts(vmlinux, store.get("base").path)


@pytest.fixture
def cli_home(artifacts: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir of its own (sandbox state, disks) that shares the built kernel, agent and images."""
    real = paths.data_dir()
    home = tmp_path / "home"
    home.mkdir()
    for shared in ("cache", "images"):
        (home / shared).symlink_to(real / shared)
    monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    yield home
    # Whatever a test left running is killed, so one failure does not leak VMs into the next test.
    result = cli("list", "--json")
    if result.returncode == 0:
        for sandbox in json.loads(result.stdout):
            cli("rm", "-f", sandbox["name"])


@dataclass
class BootedVM:
    backend: QemuBackend
    spec: VMSpec
    pid: int

    async def connect(self, port: int = 0, timeout: float = 60) -> Connection:
        return await self.backend.connect(self.spec, self.pid, port=port, timeout=timeout)


def boot(kernel_path: Path, image: Path, workdir: Path, *, acpi: bool = False) -> Iterator[BootedVM]:
    """A QEMU microVM booted from `image` through a qcow2 overlay (devices found through ACPI with
    `acpi`); killed afterwards."""
    rundir = Path(tempfile.mkdtemp(prefix="akvm-"))  # short: Unix socket paths are limited
    spec = VMSpec("testvm", kernel_path, image, workdir=workdir, rundir=rundir)
    backend = QemuBackend(acpi=acpi)
    backend.prepare(spec)
    pid = backend.start(spec)
    try:
        yield BootedVM(backend, spec, pid)
    finally:
        backend.kill(spec, pid)
        backend.cleanup(spec, keep_disk=False)


@pytest.fixture
def vm(artifacts: Artifacts, tmp_path: Path) -> Iterator[BootedVM]:
    """A QEMU microVM booted from the base image; killed afterwards."""
    yield from boot(artifacts.kernel, artifacts.base_image, tmp_path / "vm")


@contextlib.asynccontextmanager
async def connected(vm: BootedVM, port: int = 0) -> AsyncIterator[Connection]:
    conn = await vm.connect(port)
    try:
        yield conn
    finally:
        await conn.close()


def run_async(coro: object, timeout: float = 300) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]
