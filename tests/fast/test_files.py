"""Files on every face (HTTP API, SDK sync and async, MCP, CLI) on the fake backend: stat, exists,
mkdir, rename, remove, recursive listing, watch; one mode representation ("0644") everywhere."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from mcp import Client as McpClient

from agentkernel.cli import app as cli
from agentkernel.client import ApiError, AsyncClient, Client, FileEvent
from tests.fakes import guest
from tests.fast.test_mcp import error_text, ok, with_server


def _later(delay: float, action: object) -> threading.Thread:
    """Run `action` (a callable) after `delay` seconds in a thread: a change made while a watch waits."""

    def run() -> None:
        time.sleep(delay)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_file_routes_through_the_sync_sdk(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox(image="base") as box:
        made = box.files.mkdir("/work/src/pkg", mode="0700")
        assert (made.name, made.kind, made.mode) == ("/work/src/pkg", "dir", "0700")
        assert box.files.write("/work/src/pkg/a.py", b"print(1)\n", mode="0640") == 9
        assert box.files.write("/work/top.txt", b"top") == 3

        info = box.files.stat("/work/src/pkg/a.py")
        assert (info.name, info.kind, info.size, info.mode) == ("/work/src/pkg/a.py", "file", 9, "0640")
        assert box.files.exists("/work/top.txt") and not box.files.exists("/work/nothing")

        assert [e.name for e in box.files.list("/work")] == ["src", "top.txt"]
        deep = {e.name: e.mode for e in box.files.list("/work", depth=3)}
        assert deep == {"src": "0755", "top.txt": "0644", "src/pkg": "0700", "src/pkg/a.py": "0640"}
        assert [e.name for e in box.files.list("/work", depth=2)] == ["src", "top.txt", "src/pkg"]

        moved = box.files.rename("/work/top.txt", "/work/src/moved.txt")
        assert (moved.name, moved.size) == ("/work/src/moved.txt", 3)
        assert box.files.read("/work/src/moved.txt") == b"top" and not box.files.exists("/work/top.txt")

        box.files.remove("/work/src", recursive=True)
        assert box.files.list("/work") == []

        with pytest.raises(ApiError) as missing:
            box.files.stat("/work/src")
        assert (missing.value.status, missing.value.code) == (404, "file_not_found")
        with pytest.raises(ApiError) as root:
            box.files.rename("/", "/elsewhere")
        assert (root.value.status, root.value.field) == (422, "path")
        with pytest.raises(ApiError) as bad_mode:
            box.files.mkdir("/work/x", mode="rwx")
        assert (bad_mode.value.status, bad_mode.value.field) == (422, "mode")
        with pytest.raises(ApiError) as bad_depth:
            box.files.list("/work", depth=0)
        assert (bad_depth.value.status, bad_depth.value.field) == (422, "depth")
        with pytest.raises(ApiError) as not_dir:
            box.files.watch("/etc/os-release")
        assert (not_dir.value.status, not_dir.value.code) == (409, "not_a_directory")


def test_watch_through_the_sync_sdk(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox(image="base") as box:
        box.files.mkdir("/work/w")
        with box.files.watch("/work/w") as changes:
            _later(0.2, lambda: box.files.write("/work/w/new.txt", b"x"))
            first = next(iter(changes))
        assert first == FileEvent("new.txt", "file", "create")

        changes = box.files.watch("/work/w")
        _later(0.2, lambda: box.files.remove("/work/w", recursive=True))
        seen = list(changes)  # ends when the directory itself is gone
        assert FileEvent("new.txt", "file", "remove") in seen


def test_file_routes_through_the_async_sdk(api: str) -> None:
    async def main() -> None:
        async with AsyncClient(api) as ak, ak.create_sandbox(image="base") as box:
            assert (await box.files.mkdir("/work/d", mode="0750")).mode == "0750"
            await box.files.write("/work/d/f", b"abc", mode="600")
            assert (await box.files.stat("/work/d/f")).mode == "0600"
            assert await box.files.exists("/work/d/f")
            assert [e.name for e in await box.files.list("/work", depth=2)] == ["d", "d/f"]
            await box.files.rename("/work/d/f", "/work/g")
            assert not await box.files.exists("/work/d/f")
            async with await box.files.watch("/work", recursive=True) as changes:
                writing = asyncio.create_task(box.files.write("/work/d/h", b"x"))
                first = await anext(aiter(changes))
                await writing
            assert first == FileEvent("d/h", "file", "create")
            await box.files.remove("/work/d", recursive=True)
            assert [e.name for e in await box.files.list("/work")] == ["g"]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_openapi_gives_the_upload_body_and_one_mode(api: str) -> None:
    document = httpx.get(f"{api}/openapi.json").json()
    paths = document["paths"]
    put = paths["/sandboxes/{name}/files/{path}"]["put"]
    assert put["requestBody"]["content"]["application/octet-stream"]["schema"] == {
        "type": "string",
        "format": "binary",
    }
    assert document["components"]["schemas"]["FileEntry"]["properties"]["mode"]["type"] == "string"
    for route in ("stat", "exists", "mkdir", "rename", "watch"):
        assert f"/sandboxes/{{name}}/{route}/{{path}}" in paths
    assert (
        "text/event-stream" in paths["/sandboxes/{name}/watch/{path}"]["get"]["responses"]["200"]["content"]
    )


def test_watch_stream_over_plain_http(api: str) -> None:
    """The SSE stream a client without the SDK reads: a `change` event per change."""
    with (
        Client(api) as ak,
        ak.create_sandbox(image="base") as box,
        httpx.stream("GET", f"{api}/sandboxes/{box.name}/watch/tmp", timeout=10) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        _later(0.2, lambda: box.files.write("/tmp/seen", b"1"))
        lines = response.iter_lines()
        while not (line := next(lines)).startswith("event:"):
            pass
        assert line == "event: change"
        assert json.loads(next(lines).removeprefix("data: ")) == {
            "name": "seen",
            "kind": "file",
            "event": "create",
        }


def test_file_tools(tmp_path: Path) -> None:
    async def body(client: McpClient) -> None:
        ok(await client.call_tool("create_sandbox", {"name": "fbox"}))
        ok(await client.call_tool("make_directory", {"name": "fbox", "path": "/work/a/b", "mode": "0700"}))
        ok(await client.call_tool("write_file", {"name": "fbox", "path": "/work/a/b/c.txt", "content": "hi"}))
        stat = ok(await client.call_tool("stat_path", {"name": "fbox", "path": "/work/a/b"}))
        assert (stat["exists"], stat["kind"], stat["mode"]) == (True, "dir", "0700")
        absent = ok(await client.call_tool("stat_path", {"name": "fbox", "path": "/work/none"}))
        assert absent == {"path": "/work/none", "exists": False, "kind": None, "size": None, "mode": None}

        listed = ok(await client.call_tool("list_files", {"name": "fbox", "path": "/work", "depth": 3}))
        assert [(e["name"], e["mode"]) for e in listed["entries"]] == [
            ("a", "0755"),
            ("a/b", "0700"),
            ("a/b/c.txt", "0644"),
        ]
        ok(
            await client.call_tool(
                "move_path", {"name": "fbox", "path": "/work/a/b/c.txt", "to": "/work/c.txt"}
            )
        )
        assert ok(await client.call_tool("stat_path", {"name": "fbox", "path": "/work/c.txt"}))["exists"]

        watched, _ = await asyncio.gather(
            client.call_tool(
                "watch_directory", {"name": "fbox", "path": "/work", "seconds": 5, "max_events": 1}
            ),
            _write_soon(client),
        )
        changes = ok(watched)
        assert changes["changes"] == [{"name": "late.txt", "kind": "file", "event": "create"}]
        assert changes["complete"] is False
        quiet = ok(
            await client.call_tool("watch_directory", {"name": "fbox", "path": "/work", "seconds": 0.2})
        )
        assert (quiet["changes"], quiet["complete"]) == ([], True)

        ok(await client.call_tool("remove_path", {"name": "fbox", "path": "/work/a", "recursive": True}))
        left = ok(await client.call_tool("list_files", {"name": "fbox", "path": "/work"}))["entries"]
        assert [e["name"] for e in left] == ["c.txt", "late.txt"]
        assert "mode" in error_text(
            await client.call_tool("make_directory", {"name": "fbox", "path": "/work/m", "mode": "0999"})
        )
        assert "No such file" in error_text(
            await client.call_tool("move_path", {"name": "fbox", "path": "/work/ghost", "to": "/work/x"})
        )

    with_server(body, tmp_path)


async def _write_soon(client: McpClient) -> None:
    await asyncio.sleep(0.3)
    ok(await client.call_tool("write_file", {"name": "fbox", "path": "/work/late.txt", "content": "x"}))


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["agentkernel", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_files_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`agentkernel files ...` in this process (the fake backend is registered here only)."""
    assert _cli(monkeypatch, capsys, "create", "cbox")[0] == 0
    assert _cli(monkeypatch, capsys, "start", "cbox")[0] == 0
    assert _cli(monkeypatch, capsys, "files", "mkdir", "cbox", "/work/d/e", "--mode", "0700")[0] == 0
    code, out, _ = _cli(monkeypatch, capsys, "files", "ls", "cbox", "/work", "--depth", "2", "--json")
    assert code == 0
    assert [(e["name"], e["mode"]) for e in json.loads(out)] == [("d", "0755"), ("d/e", "0700")]
    assert _cli(monkeypatch, capsys, "files", "mv", "cbox", "/work/d/e", "/work/f")[0] == 0
    code, out, _ = _cli(monkeypatch, capsys, "files", "stat", "cbox", "/work/f", "--json")
    assert (code, json.loads(out)["mode"], json.loads(out)["kind"]) == (0, "0700", "dir")
    code, out, _ = _cli(monkeypatch, capsys, "files", "ls", "cbox", "/work")
    assert (code, [(line.split()[0], line.split()[-1]) for line in out.splitlines()]) == (
        0,
        [("0755", "d/"), ("0700", "f/")],
    )
    assert _cli(monkeypatch, capsys, "files", "rm", "cbox", "/work/d")[0] == 0
    code, _, err = _cli(monkeypatch, capsys, "files", "stat", "cbox", "/work/d")
    assert code == 1 and err.startswith("agentkernel: error: ") and "No such file" in err
    code, _, err = _cli(monkeypatch, capsys, "files", "mkdir", "cbox", "/work/g", "--mode", "rw")
    assert code != 0 and "mode" in err and "Traceback" not in err

    (vm,) = guest.host().running()
    (vm.root / "work/w").mkdir()
    _later(0.3, lambda: (vm.root / "work/w/made").write_bytes(b"x"))
    _later(0.6, lambda: shutil.rmtree(vm.root / "work/w"))
    code, out, _ = _cli(monkeypatch, capsys, "files", "watch", "cbox", "/work/w", "--json")
    assert code == 0  # the directory went: the watch ended by itself
    assert [json.loads(line) for line in out.splitlines()] == [
        {"name": "made", "kind": "file", "event": "create"},
        {"name": "made", "kind": "file", "event": "remove"},
        {"name": "", "kind": "dir", "event": "gone"},
    ]


def test_a_closed_watch_ends_in_the_guest(api: str) -> None:
    """Closing the SDK's watch (the client leaves) ends the watch in the guest: nothing stays behind."""

    def watching() -> int:
        return sum(len(agent.watches) for vm in guest.host().running() for agent in vm.agents)

    with Client(api) as ak, ak.create_sandbox(image="base") as box:
        changes = box.files.watch("/tmp")
        assert watching() == 1
        changes.close()
        deadline = time.monotonic() + 10
        while watching() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watching() == 0
