"""A real `agentkernel serve` (uvicorn) on a free loopback port, in a subprocess of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def api_server(
    cwd: Path, *, api_key: str | None = None, log: Path | None = None, args: Sequence[str] = ()
) -> Iterator[str]:
    """The base URL (on 127.0.0.1) of a server started with the environment of this test (its
    AGENTKERNEL_HOME) and more `serve` options `args`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "AGENTKERNEL_API_KEY"}
    if api_key:
        env["AGENTKERNEL_API_KEY"] = api_key
    out = (log or cwd / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "serve", "--port", str(port), *args],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"the server did not come up: {(cwd / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
