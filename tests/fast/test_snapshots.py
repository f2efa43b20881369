"""Snapshots and forks through the service, on the fake backend (whose disk is a directory tree)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentkernel.errors import AgentkernelError
from agentkernel.service import sandboxes, snapshots


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read(name: str, path: str) -> bytes:
    async with sandboxes.session(name) as conn:
        return b"".join([chunk async for chunk in conn.read_file(path)])


async def write(name: str, path: str, data: bytes) -> None:
    async with sandboxes.session(name) as conn:
        await conn.write_file(path, _once(data))


def test_forks_start_from_the_snapshot_and_write_their_own_copy() -> None:
    async def main() -> None:
        sandboxes.create("origin")
        await sandboxes.start("origin")
        await write("origin", "/root/state", b"before")
        snap = await snapshots.create("origin", "snap")
        assert snap.meta["source"] == "origin"
        await write("origin", "/root/state", b"after")  # the sandbox runs on, the snapshot keeps its past

        for fork in ("fork1", "fork2"):
            record = await snapshots.fork("snap", fork)
            assert (record.status, record.snapshot) == ("running", "snap")
            assert await read(fork, "/root/state") == b"before"
        await write("fork1", "/root/state", b"fork1's")
        assert await read("fork2", "/root/state") == b"before"
        assert await read("origin", "/root/state") == b"after"

        with pytest.raises(AgentkernelError, match="in use"):
            snapshots.remove("snap")
        with pytest.raises(AgentkernelError, match="already exists"):
            await snapshots.create("origin", "snap")
        for fork in ("fork1", "fork2"):
            sandboxes.remove(fork, force=True)
        snapshots.remove("snap")
        assert snapshots.list_snapshots() == []

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_stopped_sandbox_cannot_be_snapshotted() -> None:
    sandboxes.create("idle")
    with pytest.raises(AgentkernelError, match="not running"):
        asyncio.run(snapshots.create("idle", "snap"))


def test_a_fork_keeps_its_snapshots_lifetime_unless_given_its_own() -> None:
    async def main() -> None:
        sandboxes.create("timed", lifetime=600)
        await sandboxes.start("timed")
        await snapshots.create("timed", "snap")
        kept = await snapshots.fork("snap", "kept")
        given = await snapshots.fork("snap", "given", lifetime_s=60)
        endless = await snapshots.fork("snap", "endless", lifetime_s=None)
        assert (kept.lifetime_s, given.lifetime_s, endless.lifetime_s) == (600, 60, None)
        assert given.deadline is not None and endless.deadline is None
        for name in ("kept", "given", "endless", "timed"):
            sandboxes.remove(name, force=True)
        snapshots.remove("snap")

    asyncio.run(asyncio.wait_for(main(), 30))
