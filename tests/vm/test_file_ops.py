"""File operations on a real VM beyond read and write: rename, exists, and a listing of a tree."""

from __future__ import annotations

import errno

import pytest

from agentkernel.errors import AgentkernelError, FileOpError
from tests.vm.conftest import BootedVM, connected, run_async

pytestmark = pytest.mark.vm

TREE = """
mkdir -p /tmp/t/a/b/c /tmp/t/d /tmp/elsewhere
echo one > /tmp/t/f; echo two > /tmp/t/a/g; echo three > /tmp/t/a/b/c/h
ln -s /tmp/elsewhere /tmp/t/link; touch /tmp/elsewhere/hidden
ln -s /nope /tmp/t/dangling
"""


def test_rename_exists_and_walk(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            assert (await conn.run(["sh", "-c", TREE])).status.exit_code == 0

            assert await conn.exists("/tmp/t/f") and await conn.exists("/tmp/t/a")
            assert not await conn.exists("/tmp/t/nothing")
            assert not await conn.exists("/tmp/t/dangling")  # what a STAT follows is not there

            names = [(e.name, e.kind) for e in await conn.walk("/tmp/t")]
            assert names == [
                ("a", "dir"),
                ("d", "dir"),
                ("dangling", "symlink"),
                ("f", "file"),
                ("link", "symlink"),
            ]
            deeper = [e.name for e in await conn.walk("/tmp/t/", depth=3)]
            assert deeper == ["a", "d", "dangling", "f", "link", "a/b", "a/g", "a/b/c"]
            everything = await conn.walk("/tmp/t", depth=10)
            assert [e.name for e in everything][-1] == "a/b/c/h"  # never into the symlink
            assert next(e for e in everything if e.name == "a/g").size == 4
            with pytest.raises(AgentkernelError, match="/tmp/t holds more than 3 entries"):
                await conn.walk("/tmp/t", limit=3)
            with pytest.raises(FileOpError) as missing:
                await conn.walk("/tmp/none")
            assert missing.value.errno == errno.ENOENT

            await conn.rename("/tmp/t/f", "/tmp/t/d/f2")
            assert not await conn.exists("/tmp/t/f")
            assert b"".join([c async for c in conn.read_file("/tmp/t/d/f2")]) == b"one\n"
            await conn.rename("/tmp/t/a", "/tmp/t/d/a")  # a directory, with what is in it
            assert (await conn.stat("/tmp/t/d/a/b/c/h")).size == 6
            await conn.rename("/tmp/t/d/a/g", "/tmp/t/d/f2")  # a file replaces a file
            assert b"".join([c async for c in conn.read_file("/tmp/t/d/f2")]) == b"two\n"

            with pytest.raises(FileOpError, match="rename /tmp/t/gone to /tmp/t/x: No such file") as gone:
                await conn.rename("/tmp/t/gone", "/tmp/t/x")
            assert (gone.value.status, gone.value.code) == (404, "file_not_found")
            with pytest.raises(FileOpError, match="to: not absolute") as relative:
                await conn.rename("/tmp/t/d/f2", "f3")
            assert relative.value.errno == errno.EINVAL
            with pytest.raises(FileOpError) as over:
                await conn.rename("/tmp/t/d", "/tmp/t/d/a/inside")  # into itself
            assert over.value.errno == errno.EINVAL
            with pytest.raises(FileOpError) as across:
                await conn.rename("/tmp/t/d/f2", "/f2")  # /tmp is a filesystem of its own
            assert across.value.errno == errno.EXDEV

    run_async(body())


def in_order(expected: list[tuple[str, str, str]], seen: list[tuple[str, str, str]]) -> bool:
    """Whether `expected` occurs in `seen` in this order (other events may come between)."""
    rest = iter(seen)
    return all(any(e == s for s in rest) for e in expected)


def test_watch(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            await conn.mkdir("/tmp/w")
            watch = await conn.watch("/tmp/w", recursive=True)
            for step in (
                "echo x > /tmp/w/f",
                "mkdir /tmp/w/d",
                "echo y > /tmp/w/d/g",  # under a directory made after the watch began
                "mv /tmp/w/f /tmp/w/d/f2",
                "chmod 600 /tmp/w/d/f2",
                "rm /tmp/w/d/g",
                "rm -r /tmp/w",
            ):
                assert (await conn.run(["sh", "-c", step])).status.exit_code == 0
            seen = [(e.event, e.name, e.kind) async for e in watch.events()]
            assert in_order(
                [
                    ("create", "f", "file"),
                    ("write", "f", "file"),
                    ("create", "d", "dir"),
                    ("create", "d/g", "file"),
                    ("write", "d/g", "file"),
                    ("moved_from", "f", "file"),
                    ("moved_to", "d/f2", "file"),
                    ("chmod", "d/f2", "file"),
                    ("remove", "d/g", "file"),
                    ("remove", "d", "dir"),
                ],
                seen,
            ), seen
            assert seen[-1] == ("gone", "", "dir")

            with pytest.raises(FileOpError, match="watch /tmp/t/nothing: No such file") as missing:
                await conn.watch("/tmp/t/nothing")
            assert missing.value.errno == errno.ENOENT
            await conn.run(["touch", "/tmp/plain"])
            with pytest.raises(FileOpError, match="watch /tmp/plain: not a directory"):
                await conn.watch("/tmp/plain")

            # A reader that does not keep up: the guest holds what the window allows, then the kernel's
            # queue (made small here), then says that events were dropped.
            await conn.run(["sh", "-c", "echo 16 > /proc/sys/fs/inotify/max_queued_events; mkdir /tmp/v"])
            slow = await conn.watch("/tmp/v")
            long_names = 'cd /tmp/v && seq 1 800 | sed "s/^/$(printf %0200d 0)/" | xargs touch'  # 400 KiB
            assert (await conn.run(["sh", "-c", long_names])).status.exit_code == 0
            events = slow.events()
            kinds = set()
            async for event in events:
                kinds.add(event.event)
                if event.event == "overflow":
                    break
            assert {"create", "overflow"} <= kinds
            await events.aclose()
            assert (await conn.run(["echo", "still"])).stdout == b"still\n"

    run_async(body())
