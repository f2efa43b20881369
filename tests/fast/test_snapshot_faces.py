"""Snapshots, forks, pause and resume through the HTTP API (the SDK, sync and async) and MCP, on a real
API server over the fake backend. A paused fake sandbox's stand-in VMM is a stopped process (SIGSTOP):
the tests read its state from /proc to see that a pause reached the backend."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import pytest
from mcp import Client as McpClient

from agentkernel.backends import registry
from agentkernel.client import ApiError, AsyncClient, Client
from agentkernel.mcp_server.server import build_server
from agentkernel.sandbox import state
from tests.fakes import backend as fake
from tests.fast.test_mcp import error_text, ok


def vmm_state(name: str) -> str:
    """The stand-in VMM's process state: R or S running or sleeping, T stopped."""
    pid = state.get(name).pid
    assert pid is not None
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_openapi_documents_the_routes(api: str) -> None:
    paths = httpx.get(f"{api}/openapi.json").json()["paths"]
    for path, method in (
        ("/sandboxes/{name}/timeout", "post"),
        ("/sandboxes/{name}/pause", "post"),
        ("/sandboxes/{name}/resume", "post"),
        ("/sandboxes/{name}/snapshots", "post"),
        ("/snapshots", "get"),
        ("/snapshots/{snapshot}", "get"),
        ("/snapshots/{snapshot}", "delete"),
        ("/snapshots/{snapshot}/fork", "post"),
    ):
        assert method in paths[path], path
    created = paths["/sandboxes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert created["$ref"].endswith("/CreateRequest")


def test_pause_and_resume_sync(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box") as box:
        box.write_file("/root/kept", b"memory")
        assert box.pause().status == "paused"
        assert vmm_state("box") == "T"
        assert box.pause().status == "paused"  # pausing a paused one changes nothing
        assert [s.status for s in ak.list_sandboxes()] == ["paused"]
        with pytest.raises(ApiError) as refused:
            box.exec(["true"])
        assert refused.value.status == 409
        assert "paused" in refused.value.detail and "resume" in refused.value.detail
        with pytest.raises(ApiError) as files:
            box.read_file("/root/kept")
        assert files.value.status == 409
        with pytest.raises(ApiError) as snapshot:
            box.snapshot("snap")
        assert snapshot.value.status == 409
        with pytest.raises(ApiError) as start:
            box.start()
        assert start.value.status == 409

        assert box.resume().status == "running"
        assert vmm_state("box") != "T"
        assert box.read_file("/root/kept") == b"memory"
        assert box.exec(["echo", "back"]).stdout == "back\n"
        with pytest.raises(ApiError) as not_paused:
            box.stop()
            box.resume()
        assert not_paused.value.status == 409


def test_a_paused_sandbox_stops_and_is_removed(api: str) -> None:
    with Client(api) as ak:
        box = ak.create_sandbox("box")
        box.pause()
        assert box.stop().status == "stopped"
        assert box.start().status == "running"
        box.pause()
        with pytest.raises(ApiError) as running:
            box.remove()
        assert running.value.status == 409
        box.remove(force=True)
        assert ak.list_sandboxes() == []


def test_snapshot_and_fork_sync(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("origin", timeout=0) as origin:
        origin.write_file("/root/state", b"before")
        snap = origin.snapshot("snap")
        assert (snap.name, snap.source, snap.image) == ("snap", "origin", "base")
        origin.write_file("/root/state", b"after")
        assert [s.name for s in ak.list_snapshots()] == ["snap"]
        assert "image_path" not in httpx.get(f"{api}/snapshots/snap").json()  # no host paths
        with ak.fork("snap", "copy") as copy:
            left = copy.info.lifetime_left_s  # the server's default lifetime, its own
            assert copy.info.status == "running" and left is not None and 3500 < left <= 3600
            assert copy.info.lifetime_s == 3600  # and each later start's, not only this run's
            assert copy.read_file("/root/state") == b"before"
            with pytest.raises(ApiError):
                ak.remove_snapshot("snap")  # a fork of it exists
        with ak.fork("snap", timeout=0) as unnamed:
            assert unnamed.name.startswith("sandbox-") and unnamed.info.lifetime_left_s is None
            assert unnamed.info.lifetime_s is None
        ak.remove_snapshot("snap")
        assert ak.list_snapshots() == []
        with pytest.raises(ApiError) as bad:
            origin.snapshot("no/slash")
        assert bad.value.status == 422


def test_async_sdk(api: str) -> None:
    async def main() -> None:
        async with AsyncClient(api) as ak, ak.create_sandbox("abox") as box:
            assert (await box.pause()).status == "paused"
            with pytest.raises(ApiError) as refused:
                await box.exec(["true"])
            assert refused.value.status == 409
            assert (await box.resume()).status == "running"
            snap = await box.snapshot("asnap")
            assert snap.source == "abox"
            assert [s.name for s in await ak.list_snapshots()] == ["asnap"]
            async with ak.fork("asnap", "afork") as fork:
                assert fork.info.status == "running"
                assert (await fork.exec(["echo", "forked"])).stdout == "forked\n"
            await ak.remove_snapshot("asnap")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_mcp_tools(tmp_path: Path) -> None:
    async def main() -> None:
        async with McpClient(build_server(tmp_path)) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert {"pause_sandbox", "resume_sandbox", "snapshot_sandbox", "fork_snapshot"} <= names
            ok(await client.call_tool("create_sandbox", {"name": "m"}))
            assert ok(await client.call_tool("pause_sandbox", {"name": "m"}))["status"] == "paused"
            text = error_text(await client.call_tool("exec_in_sandbox", {"name": "m", "command": "true"}))
            assert "paused" in text and "resume" in text
            assert ok(await client.call_tool("resume_sandbox", {"name": "m"}))["status"] == "running"
            snap = ok(await client.call_tool("snapshot_sandbox", {"name": "m", "snapshot": "s"}))
            assert (snap["name"], snap["source"]) == ("s", "m")
            listed = ok(await client.call_tool("list_snapshots"))["snapshots"]
            assert [s["name"] for s in listed] == ["s"]
            fork = ok(await client.call_tool("fork_snapshot", {"snapshot": "s", "name": "f", "timeout": 120}))
            assert (fork["status"], fork["snapshot"]) == ("running", "s")
            assert 110 < fork["lifetime_left_s"] <= 120 and fork["lifetime_s"] == 120
            for name in ("f", "m"):
                ok(await client.call_tool("remove_sandbox", {"name": name, "force": True}))
            ok(await client.call_tool("remove_snapshot", {"snapshot": "s"}))
            assert ok(await client.call_tool("list_snapshots"))["snapshots"] == []

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_backend_without_pause_refuses_it(api: str) -> None:
    registry.register(dataclasses.replace(fake.INFO, capabilities=fake.INFO.capabilities - {"pause"}))
    with Client(api) as ak, ak.create_sandbox("box") as box:
        with pytest.raises(ApiError) as refused:
            box.pause()
        assert refused.value.status == 409 and "cannot pause" in refused.value.detail
        assert box.refresh().status == "running" and vmm_state("box") != "T"
