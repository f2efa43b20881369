"""Shared fixtures. Tests that boot VMs use the artifacts `agentkernel setup` built in the data dir.

Markers (pyproject.toml) are also set here from what a test uses, so `-m "not vm"` leaves out every
test that boots a VM without each module having to say so: `vm` for the fixtures that need the built
kernel and images, `podman` for the container engine's, `root` for a skip whose reason is root.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel import procs

REPO = Path(__file__).resolve().parent.parent
VM_FIXTURES = frozenset({"artifacts", "cli_home", "vm"})
"""Fixtures that boot a VM or need what `agentkernel setup` built (tests/vm/conftest.py)."""
ENGINE_FIXTURES = frozenset({"engine"})
"""Fixtures that need a working container engine (tests/container/conftest.py)."""
NEEDS_ROOT = re.compile(r"\broot\b")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & VM_FIXTURES:
            item.add_marker(pytest.mark.vm)
        if used & ENGINE_FIXTURES:
            item.add_marker(pytest.mark.podman)
        if any(NEEDS_ROOT.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.root)
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty AGENTKERNEL_HOME for tests that must not see or touch the real data dir."""
    home = tmp_path / "akhome"
    monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
    yield home


def cli(*args: str, env: dict[str, str] | None = None, input: bytes | None = None, timeout: float = 600):
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "agentkernel", *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        input=input,
        timeout=timeout,
    )


HEAVY = ("typer", "click", "rich", "pydantic", "asyncio", "anyio", "agentkernel.service.service")
"""What the thin command line must not import (`cli/thin.py`)."""


def either_cli(
    *args: str,
    full: bool = False,
    trace: Path | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """The real CLI in a subprocess, thin where it can be (`full`: the full command line only); a
    command the thin path did itself lists the modules it loaded in `trace`."""
    from agentkernel.cli import thin

    environ = {**os.environ, **(env or {})}
    environ.pop(thin.FULL_ENV, None)
    if full:
        environ[thin.FULL_ENV] = "1"
    if trace is not None:
        environ[thin.TRACE_ENV] = str(trace)
    argv = [sys.executable, "-m", "agentkernel", *args]
    return subprocess.run(argv, capture_output=True, env=environ, input=input, timeout=timeout)


def heavy_imports(trace: Path) -> list[str]:
    """The modules in `trace` that the thin command line must not import."""
    return [m for m in trace.read_text().split() if m.split(".")[0] in HEAVY or m in HEAVY]


HOST_PAGE = "host page, for the gateway to let through or refuse"


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback (its port): what a sandbox reaches only if allowed."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = HOST_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether process `pid` ends (a zombie counts as ended) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while procs.running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
