"""Fixtures for tests that boot real microVMs with the artifacts `agentkernel setup` built."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentkernel.artifacts import kernel
from agentkernel.backends.base import VMSpec
from agentkernel.backends.qemu import QemuBackend
from agentkernel.images import store
from agentkernel.protocol.client import Connection


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


@dataclass
class BootedVM:
    backend: QemuBackend
    spec: VMSpec
    pid: int

    async def connect(self, port: int = 0, timeout: float = 60) -> Connection:
        return await self.backend.connect(self.spec, self.pid, port=port, timeout=timeout)


@pytest.fixture
def vm(artifacts: Artifacts, tmp_path: Path) -> Iterator[BootedVM]:
    """A QEMU microVM booted from the base image through a qcow2 overlay; killed afterwards."""
    rundir = Path(tempfile.mkdtemp(prefix="akvm-"))  # short: Unix socket paths are limited
    spec = VMSpec("testvm", artifacts.kernel, artifacts.base_image, workdir=tmp_path / "vm", rundir=rundir)
    backend = QemuBackend()
    backend.prepare(spec)
    pid = backend.start(spec)
    try:
        yield BootedVM(backend, spec, pid)
    finally:
        backend.kill(spec, pid)
        backend.cleanup(spec, keep_disk=False)


@contextlib.asynccontextmanager
async def connected(vm: BootedVM, port: int = 0) -> AsyncIterator[Connection]:
    conn = await vm.connect(port)
    try:
        yield conn
    finally:
        await conn.close()


def run_async(coro: object, timeout: float = 300) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]
