"""Shared fixtures. Tests that boot VMs use the artifacts `agentkernel setup` built in the data dir."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
