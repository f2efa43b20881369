"""The SDK's own behaviour against a real server: handles opened straight into `async with`, output
callbacks, and transport failures raised as the SDK's ClientConnectionError."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from agentkernel.client import (
    AsyncClient,
    Client,
    ClientConnectionError,
    ClientError,
    ExitEvent,
    OutputEvent,
    Started,
)
from tests.api.server import api_server, free_port

pytestmark = pytest.mark.vm

LINES = "seq 1 20000; echo done >&2"
SEQ = "".join(f"{i}\n" for i in range(1, 20001))


def test_async_with_opens_directly_and_callbacks_get_chunks(api: str) -> None:
    async def main() -> None:
        out: list[str] = []
        err: list[str] = []

        async def on_stdout(chunk: str) -> None:  # a coroutine function is awaited
            await asyncio.sleep(0)
            out.append(chunk)

        async with AsyncClient(api) as ak:
            async with ak.create_sandbox(image="base") as box:
                name = box.name
                assert (await ak.list_sandboxes())[0].name == name
                result = await box.exec(["sh", "-c", LINES], on_stdout=on_stdout, on_stderr=err.append)
                assert (result.exit_code, result.stdout, result.stderr) == (0, SEQ, "done\n")
                assert "".join(out) == SEQ and err == ["done\n"]

                seen: list[str] = []
                events = [e async for e in box.exec_stream(["sh", "-c", LINES], on_stdout=seen.append)]
                chunks = [e.data for e in events if isinstance(e, OutputEvent) and e.stream == "stdout"]
                assert seen == chunks and "".join(chunks) == SEQ and events[-1] == ExitEvent(0, None, False)

                async with box.attach(["cat"]) as term:
                    await term.send(b"typed\n")
                    await term.eof()
                    assert b"typed" in b"".join([c async for c in term])
                async with ak.sandbox(name) as same:  # not owned: left in place
                    assert same.info.status == "running"
                assert [s.name for s in await ak.list_sandboxes()] == [name]
            assert await ak.list_sandboxes() == []

    asyncio.run(asyncio.wait_for(main(), 180))


def test_sync_callbacks_get_chunks(api: str) -> None:
    with Client(api) as ak:
        out: list[str] = []
        ran = ak.run(["sh", "-c", LINES], image="base", on_stdout=out.append)
        assert ran.ok and ran.stdout == SEQ and "".join(out) == SEQ and ran.stderr == "done\n"
        with ak.create_sandbox(image="base") as box:
            err: list[str] = []
            done = box.exec(["sh", "-c", "echo a; echo b >&2; exit 4"], on_stderr=err.append)
            assert (done.exit_code, done.stdout, err) == (4, "a\n", ["b\n"])
            seen: list[str] = []
            events = list(box.exec_stream(["sh", "-c", LINES], on_stdout=seen.append))
            assert seen == [e.data for e in events if isinstance(e, OutputEvent) and e.stream == "stdout"]
            assert "".join(seen) == SEQ


def test_a_stopped_server_raises_the_sdks_connection_error(cli_home: Path, tmp_path: Path) -> None:
    with api_server(tmp_path) as url:
        pass  # stopped: nothing listens there any more

    def refused(exc: BaseException) -> None:
        assert isinstance(exc, ClientConnectionError) and isinstance(exc, ClientError)
        assert isinstance(exc, ConnectionError) and not isinstance(exc, httpx.HTTPError)
        assert url in str(exc)

    with Client(url) as ak:
        for call in (ak.list_sandboxes, lambda: list(ak.run_stream(["true"])), lambda: ak.run(["true"])):
            with pytest.raises(ClientConnectionError) as raised:
                call()
            refused(raised.value)

    async def main() -> None:
        async with AsyncClient(url) as ak:
            with pytest.raises(ClientConnectionError) as raised:
                await ak.health()
            refused(raised.value)
            with pytest.raises(ClientConnectionError) as raised:
                async with ak.create_sandbox():
                    pass
            refused(raised.value)
            with pytest.raises(ClientConnectionError):
                [e async for e in ak.run_stream(["true"])]

    asyncio.run(main())


def test_a_timeout_raises_the_sdks_connection_error(api: str) -> None:
    with Client(api, timeout=0.5) as ak, pytest.raises(ClientConnectionError, match="timed out"):
        ak.run(["sleep", "30"], image="base")


@contextmanager
def killable_server(cwd: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    with (cwd / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "agentkernel", "serve", "--port", str(port)],
            cwd=cwd,
            env=os.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url) as probe:
            for _ in range(300):
                try:
                    probe.health()
                    break
                except ClientConnectionError:
                    time.sleep(0.1)
        yield url, server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def test_a_dropped_stream_raises_the_sdks_connection_error(cli_home: Path, tmp_path: Path) -> None:
    """The server dies while a command streams: iterating on raises ClientConnectionError."""
    with killable_server(tmp_path) as (url, server), Client(url) as ak:
        box = ak.create_sandbox(image="base")  # removed by the fixture: its server is gone
        events = box.exec_stream(["sh", "-c", "echo ready; sleep 600"])
        assert isinstance(next(events), Started)
        assert next(events) == OutputEvent("stdout", "ready\n")
        server.send_signal(signal.SIGKILL)
        with pytest.raises(ClientConnectionError):
            next(events)
