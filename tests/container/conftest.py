"""Fixtures for container-backend tests: a real engine (podman here), or a skip with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agentkernel.artifacts import kernel
from agentkernel.backends.base import VMSpec
from agentkernel.backends.container import backend as container
from agentkernel.backends.container.backend import ContainerBackend
from agentkernel.errors import EngineUnavailable
from agentkernel.images import store
from agentkernel.protocol.connection import Connection


@pytest.fixture(scope="session")
def engine() -> container.Engine:
    try:
        return container.find_engine()
    except EngineUnavailable as exc:
        pytest.skip(f"no container engine works here: {exc}")


@pytest.fixture(scope="session")
def base_image() -> Path:
    return store.get("base").path


@dataclass
class Sandbox:
    backend: ContainerBackend
    spec: VMSpec
    pid: int = 0

    def start(self) -> int:
        self.pid = self.backend.start(self.spec)
        return self.pid

    async def connect(self, timeout: float = 30) -> Connection:
        return await self.backend.connect(self.spec, self.pid, port=0, timeout=timeout)

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Connection]:
        conn = await self.connect()
        try:
            yield conn
        finally:
            await conn.close()


@pytest.fixture
def make_sandbox(engine: container.Engine, base_image: Path, tmp_path: Path) -> Iterator[object]:
    """make_sandbox(name, profile=..., **VMSpec fields): a prepared (created, not started) container."""
    made: list[Sandbox] = []

    def make(name: str = "ctest", *, profile: str = "moderate", **fields: object) -> Sandbox:
        rundir = Path(tempfile.mkdtemp(prefix="akct-"))  # short: Unix socket paths are limited
        spec = VMSpec(name, kernel.current() or Path("/nonexistent"), base_image, tmp_path / name, rundir)
        spec = replace(spec, **fields)  # type: ignore[arg-type]
        box = Sandbox(ContainerBackend(engine, profile=profile), spec)
        made.append(box)
        box.backend.prepare(spec)
        return box

    yield make
    for box in made:
        if box.pid:
            box.backend.kill(box.spec, box.pid)
        box.backend.cleanup(box.spec, keep_disk=False)


def run_async(coro: object, timeout: float = 120) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]
