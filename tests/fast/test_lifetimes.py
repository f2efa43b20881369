"""Lifetimes on every face but the CLI (tests/vm/test_pause.py has it): at create, changed while the
sandbox runs, and the servers' default; on a real API server and the MCP server, over the fake backend.

The watchdog is the real one (a detached shell that sleeps until the deadline its file names): these
tests look at the stand-in VMM's process itself, not only at the record, to tell the watchdog's work
from the service's reconciling on read.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from mcp import Client as McpClient

from agentkernel.api.app import create_app
from agentkernel.client import ApiError, AsyncClient, Client
from agentkernel.mcp_server.server import build_server
from agentkernel.sandbox import state
from agentkernel.service.lifetimes import DEFAULT_LIFETIME
from tests.api.server import free_port
from tests.conftest import wait_gone
from tests.fast.test_mcp import error_text, ok


@contextlib.contextmanager
def serving(project: Path, **options: Any) -> Iterator[str]:
    """A real API server made with `options` (create_app's), on a free loopback port; its URL."""
    app = create_app(project_dir=project, api_key=None, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API server did not come up"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def vmm_pid(name: str) -> int:
    pid = state.get(name).pid
    assert pid is not None
    return pid


def test_api_default_lifetime_and_timeout_at_create(api: str) -> None:
    with Client(api) as ak:
        with ak.create_sandbox("plain") as box:
            assert box.info.lifetime_s == DEFAULT_LIFETIME  # the server's default: not forever
            assert box.info.lifetime_left_s is not None
            assert DEFAULT_LIFETIME - 30 < box.info.lifetime_left_s <= DEFAULT_LIFETIME
        with ak.create_sandbox("short", timeout=120) as box:
            assert (box.info.lifetime_s, box.refresh().status) == (120, "running")
        with ak.create_sandbox("forever", timeout=0) as box:
            assert (box.info.lifetime_s, box.info.lifetime_left_s) == (None, None)
        with pytest.raises(ApiError) as bad:
            ak.create_sandbox("bad", timeout=0.5)
        assert (bad.value.status, bad.value.field) == (422, "timeout")


def test_server_without_a_default_lifetime(tmp_path: Path) -> None:
    with (
        serving(tmp_path, default_lifetime=None) as url,
        Client(url) as ak,
        ak.create_sandbox("box") as box,
    ):
        assert (box.info.lifetime_s, box.info.lifetime_left_s) == (None, None)
        box.set_timeout(60)  # a lifetime can still be given to it while it runs
        left = box.refresh().lifetime_left_s
        assert left is not None and 50 < left <= 60


def test_set_timeout_extends_past_the_first_deadline(api: str) -> None:
    """The watchdog armed at start must not kill at the old deadline once the deadline moved later."""
    with Client(api) as ak, ak.create_sandbox("box", timeout=2) as box:
        pid = vmm_pid("box")
        assert box.set_timeout(30).lifetime_left_s is not None
        assert not wait_gone(pid, 4.0)  # well past the first deadline
        assert box.refresh().status == "running"
        assert box.exec(["echo", "alive"]).stdout == "alive\n"


def test_set_timeout_shortens(api: str) -> None:
    """A deadline moved earlier gets a watchdog of its own: the VMM dies without anyone reading it."""
    with Client(api) as ak, ak.create_sandbox("box") as box:
        pid = vmm_pid("box")
        box.set_timeout(1)
        assert wait_gone(pid, 5.0)
        info = box.refresh()
        assert info.status == "stopped"
        assert box.start().status == "running"  # a later start gets its lifetime (the default) again
        assert box.info.lifetime_s == DEFAULT_LIFETIME


def test_set_timeout_zero_removes_the_lifetime(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box", timeout=2) as box:
        pid = vmm_pid("box")
        assert box.set_timeout(0).lifetime_left_s is None
        assert not wait_gone(pid, 3.5)
        assert box.refresh().status == "running"


def test_set_timeout_refusals(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box", start=False) as box:
        with pytest.raises(ApiError) as stopped:
            box.set_timeout(60)
        assert (stopped.value.status, stopped.value.code) == (409, "sandbox_not_running")
        box.start()
        for bad in (-1, 0.5, 31 * 86400):
            with pytest.raises(ApiError) as invalid:
                box.set_timeout(bad)
            assert (invalid.value.status, invalid.value.field) == (422, "timeout")
    with Client(api) as ak, pytest.raises(ApiError) as missing:
        ak.sandbox("nobody")
    assert missing.value.status == 404


def test_async_sdk_lifetimes(api: str) -> None:
    async def main() -> None:
        async with AsyncClient(api) as ak, ak.create_sandbox("abox", timeout=300) as box:
            assert box.info.lifetime_s == 300
            info = await box.set_timeout(1000)
            assert info.lifetime_left_s is not None and 990 < info.lifetime_left_s <= 1000
            assert (await box.refresh()).lifetime_left_s is not None

    asyncio.run(asyncio.wait_for(main(), 30))


def test_mcp_lifetimes(tmp_path: Path) -> None:
    async def body(client: McpClient, default: float | None) -> None:
        box = ok(await client.call_tool("create_sandbox", {"name": "m1"}))
        assert box["lifetime_s"] == default
        box = ok(await client.call_tool("create_sandbox", {"name": "m2", "timeout": 90}))
        assert box["lifetime_s"] == 90
        changed = ok(await client.call_tool("set_sandbox_timeout", {"name": "m2", "timeout": 500}))
        assert 490 < changed["lifetime_left_s"] <= 500
        assert "timeout" in error_text(
            await client.call_tool("set_sandbox_timeout", {"name": "m2", "timeout": -3})
        )
        for name in ("m1", "m2"):
            ok(await client.call_tool("remove_sandbox", {"name": name, "force": True}))

    async def main() -> None:
        for default in (45.0, None):
            async with McpClient(build_server(tmp_path, default_lifetime=default)) as client:
                await body(client, default)

    asyncio.run(asyncio.wait_for(main(), 60))
