"""The fake guest keeps to the protocol where the service relies on it, and never reaches past its
own tree on the host."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.backends.base import VMSpec
from agentkernel.errors import FileOpError
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import MAX_PAYLOAD
from tests.fakes.backend import FakeBackend, root_of


@pytest.fixture
def spec(tmp_path: Path) -> Iterator[VMSpec]:
    spec = VMSpec(
        "guest",
        kernel=tmp_path / "vmlinux",
        image=tmp_path / "image",
        workdir=tmp_path / "vm",
        rundir=paths.runtime_dir() / secrets.token_hex(6),
        read_only=False,
    )
    yield spec
    FakeBackend().kill(spec, None)
    FakeBackend().cleanup(spec, keep_disk=False)


async def booted(spec: VMSpec) -> Connection:
    backend = FakeBackend()
    backend.prepare(spec)
    pid = backend.start(spec)
    return await backend.connect(spec, pid, port=0, timeout=5)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def test_paths_stay_in_the_guest_tree(spec: VMSpec, tmp_path: Path) -> None:
    outside = tmp_path / "outside"

    async def main() -> None:
        conn = await booted(spec)
        try:
            await conn.mkdir(f"/../../../../..{outside.parent}", parents=True)
            await conn.write_file(f"/../../../../..{outside}", _once(b"contained"))
            assert [e.name for e in await conn.list_dir("/..")] == [e.name for e in await conn.list_dir("/")]
            with pytest.raises(FileOpError, match="Device or resource busy"):
                await conn.remove("/", recursive=True)
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert not outside.exists()
    assert (root_of(spec) / str(outside).lstrip("/")).read_bytes() == b"contained"


def test_read_only_root_refuses_writes_but_tmp(spec: VMSpec) -> None:
    async def main() -> None:
        conn = await booted(replace(spec, read_only=True))
        try:
            with pytest.raises(FileOpError, match="Read-only file system"):
                await conn.write_file("/root/x", _once(b"x"))
            assert await conn.write_file("/tmp/x", _once(b"x")) == 1
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_long_arguments_signals_and_big_files(spec: VMSpec) -> None:
    async def main() -> None:
        conn = await booted(spec)
        try:
            words = ["w" * 1000] * (MAX_PAYLOAD // 500)  # more than one frame: EXEC and then ARGS
            done = await conn.run(["echo", *words])
            assert done.stdout == (" ".join(words) + "\n").encode()

            proc = await conn.exec(["sleep", "60"])
            await proc.signal(15)
            assert (await asyncio.wait_for(proc.wait(), 5)).signal == 15

            data = bytes(range(256)) * 4096  # 1 MiB: past the windows both ways
            assert await conn.write_file("/root/big", _once(data)) == len(data)
            assert b"".join([c async for c in conn.read_file("/root/big")]) == data
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 20))
