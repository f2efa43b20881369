"""Fixtures of the fast layer: every test gets a data dir of its own and the fake backend (no VM).

Sandboxes here run the fake guest (tests/fakes) through the real service, API and MCP code; what a
test leaves running is removed afterwards, so one failure does not leak into the next test.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from agentkernel.api.app import create_app
from agentkernel.config import DEFAULT_MEMORY_MB, DEFAULT_VCPUS, PROFILES
from agentkernel.errors import AgentkernelError
from agentkernel.pool import daemon
from agentkernel.service import sandboxes
from tests.api.server import free_port
from tests.fakes import backend as fake
from tests.fakes import guest, home


@pytest.fixture(autouse=True)
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir of its own with a stand-in kernel and images, and the fake backend registered (it
    ranks first: sandboxes made without a backend named run on it)."""
    data = tmp_path / "home"
    monkeypatch.setenv("AGENTKERNEL_HOME", str(data))
    monkeypatch.delenv("AGENTKERNEL_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    home.populate()
    fake.register()
    try:
        yield data
    finally:
        for record in sandboxes.list_sandboxes(pooled=True):
            with contextlib.suppress(AgentkernelError):
                sandboxes.remove(record.name, force=True)
        guest.host().power_off_all()  # what this test started and did not remove
        fake.unregister()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    """The URL of a real API server (uvicorn, on a free loopback port) in a thread of this process,
    where the fake backend is registered; without an API key."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(project_dir=tmp_path, api_key=None),
            host="127.0.0.1",
            port=free_port(),
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the API server did not come up")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def pool() -> Iterator[daemon.Pool]:
    """A pool daemon in threads of this process (its request server and its worker, as `daemon.run`
    has them) keeping 2 sandboxes of the default kind (`base`, what `run` makes) ready."""
    kind = daemon.Kind("base", 2, PROFILES["moderate"], DEFAULT_VCPUS, DEFAULT_MEMORY_MB, None)
    with serving(daemon.Pool([kind], max_age=600, health_interval=0.5)) as pool:
        yield pool


@contextlib.contextmanager
def serving(pool: daemon.Pool) -> Iterator[daemon.Pool]:
    """`pool` served in threads of this process: its request server and its worker, as
    `daemon.run` has them; drained afterwards."""
    loop = asyncio.new_event_loop()
    shutdown = asyncio.Event()
    server = threading.Thread(
        target=loop.run_until_complete, args=(daemon.serve(pool, shutdown),), daemon=True
    )
    worker = threading.Thread(target=pool.work, name="pool-worker", daemon=True)
    server.start()
    worker.start()
    try:
        yield pool
    finally:
        loop.call_soon_threadsafe(shutdown.set)
        pool.stopping.set()
        pool.wake.set()
        server.join(timeout=20)
        worker.join(timeout=20)
        loop.close()
        pool.drain()
