"""Files on the faces against a real VM: the SDK (over a real `agentkernel serve`) renames, lists a
tree recursively and watches a directory through the guest's inotify; the real CLI's `files`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agentkernel.client import AsyncClient, Client, FileEvent
from tests.api.conftest import api  # noqa: F401  (fixture)
from tests.conftest import cli

pytestmark = pytest.mark.vm

TREE = (
    "mkdir -p /tmp/t/a/b /tmp/away && echo one > /tmp/t/f && echo two > /tmp/t/a/b/g && "
    "chmod 640 /tmp/t/f && ln -s /tmp/away /tmp/t/link && touch /tmp/away/hidden"
)


def test_rename_and_recursive_list(api: str) -> None:  # noqa: F811
    with Client(api) as ak, ak.create_sandbox(image="base") as box:
        assert box.exec(["sh", "-c", TREE]).exit_code == 0
        tree = {e.name: (e.kind, e.mode) for e in box.files.list("/tmp/t", depth=5)}
        assert tree == {
            "a": ("dir", "0755"),
            "f": ("file", "0640"),
            "link": ("symlink", "0777"),  # listed, never followed
            "a/b": ("dir", "0755"),
            "a/b/g": ("file", "0644"),
        }
        assert [e.name for e in box.files.list("/tmp/t", depth=1)] == ["a", "f", "link"]
        moved = box.files.rename("/tmp/t/a", "/tmp/t/z")
        assert (moved.name, moved.kind) == ("/tmp/t/z", "dir")
        assert box.files.read("/tmp/t/z/b/g") == b"two\n" and not box.files.exists("/tmp/t/a")
        assert box.files.stat("/tmp/t/f").mode == "0640"
        made = box.files.mkdir("/tmp/t/new/deep", mode="0700")
        assert (made.kind, made.mode) == ("dir", "0700")


def test_watch_through_the_sdk(api: str) -> None:  # noqa: F811
    with Client(api) as ak, ak.create_sandbox(image="base") as box:
        box.files.mkdir("/tmp/w")
        with box.files.watch("/tmp/w") as changes:
            box.exec(["sh", "-c", "echo x > /tmp/w/a; mv /tmp/w/a /tmp/w/b; chmod 600 /tmp/w/b; rm /tmp/w/b"])
            seen: list[FileEvent] = []
            for change in changes:
                seen.append(change)
                if change.event == "remove":
                    break
        assert [(c.name, c.event) for c in seen] == [
            ("a", "create"),
            ("a", "write"),
            ("a", "moved_from"),
            ("b", "moved_to"),
            ("b", "chmod"),
            ("b", "remove"),
        ]

        async def watch_async() -> list[FileEvent]:
            async with AsyncClient(api) as aak:
                abox = await aak.sandbox(box.name)

                async with await abox.files.watch("/tmp/w", recursive=True) as more:
                    await abox.exec(["sh", "-c", "mkdir /tmp/w/sub && sleep 1 && touch /tmp/w/sub/f"])
                    got = []
                    async for change in more:
                        got.append(change)
                        if change.name == "sub/f":
                            break
                    return got

        got = asyncio.run(asyncio.wait_for(watch_async(), 120))
        assert FileEvent("sub", "dir", "create") in got and FileEvent("sub/f", "file", "create") in got

        ending = box.files.watch("/tmp/w")
        box.exec(["rm", "-rf", "/tmp/w"])
        assert list(ending)[-1] == FileEvent("sub", "dir", "remove")  # then the stream ends


def test_files_cli(cli_home: Path) -> None:
    assert cli("create", "fbox").returncode == 0
    assert cli("start", "fbox").returncode == 0
    assert cli("files", "mkdir", "fbox", "/tmp/x/y", "--mode", "0700").returncode == 0
    listed = cli("files", "ls", "fbox", "/tmp/x", "--depth", "2", "--json")
    assert [(e["name"], e["mode"]) for e in json.loads(listed.stdout)] == [("y", "0700")]
    assert cli("files", "mv", "fbox", "/tmp/x/y", "/tmp/x/z").returncode == 0
    stat = cli("files", "stat", "fbox", "/tmp/x/z", "--json")
    assert json.loads(stat.stdout)["kind"] == "dir"
    assert cli("files", "rm", "fbox", "/tmp/x", "-r").returncode == 0
    gone = cli("files", "stat", "fbox", "/tmp/x")
    assert gone.returncode == 1 and b"Traceback" not in gone.stderr
