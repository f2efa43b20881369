"""The HTTP API on a real uvicorn server, driven by the SDK (sync and async), against real sandboxes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from agentkernel.client import (
    ApiError,
    AsyncClient,
    Client,
    ExitEvent,
    OutputEvent,
    Sandbox,
    Started,
)
from tests.api.server import api_server

pytestmark = pytest.mark.vm


def test_run_and_sandbox_life_cycle(api: str) -> None:
    with Client(api) as ak:
        result = ak.run(
            ["sh", "-c", 'echo "$GREETING from $PWD"; cat; echo err >&2; exit 3'],
            env={"GREETING": "hi"},
            cwd="/tmp",
            stdin="piped\n",
        )
        assert (result.exit_code, result.stdout, result.stderr) == (3, "hi from /tmp\npiped\n", "err\n")
        assert ak.list_sandboxes() == []  # the one-off sandbox is gone

        with ak.create_sandbox("box", image="base") as box:
            assert box.info.status == "running"
            assert [s.name for s in ak.list_sandboxes()] == ["box"]
            slow = box.exec(["sleep", "30"], timeout=1)
            assert slow.timed_out and slow.exit_code is None

            assert box.write_file("/root/deep/er/note.txt", b"kept\n", mode="0600", parents=True) == 5
            stopped = box.stop()
            assert stopped.status == "stopped"
            with pytest.raises(ApiError) as not_running:
                box.exec(["true"])
            assert (not_running.value.status, not_running.value.code) == (409, "sandbox_not_running")
            box.start()
            assert box.read_file("/root/deep/er/note.txt") == b"kept\n"
            entries = {e.name: e for e in box.list_files("/root/deep/er")}
            assert entries["note.txt"].kind == "file" and entries["note.txt"].mode == "0600"
            box.remove_file("/root/deep", recursive=True)
            assert box.exec(["ls", "/root"]).stdout == ""
        assert ak.list_sandboxes() == []
        with pytest.raises(ApiError) as gone:
            ak.sandbox("box")
        assert (gone.value.status, gone.value.code) == (404, "sandbox_not_found")


def test_large_file_round_trip_streams(api: str, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * (24 << 12))  # 24 MiB
    with Client(api) as ak, ak.create_sandbox() as box, blob.open("rb") as f:
        assert box.write_file("/root/blob.bin", f) == blob.stat().st_size
        chunks = list(box.iter_file("/root/blob.bin"))
        assert len(chunks) > 1
        assert b"".join(chunks) == blob.read_bytes()
        assert box.exec(["sh", "-c", "wc -c < /root/blob.bin"]).stdout.strip() == str(24 << 20)


def test_sse_events_arrive_while_the_command_runs(api: str) -> None:
    """Output reaches the client as it is produced: the first line seconds before the command ends."""
    script = "echo first; sleep 3; echo second >&2; exit 7"
    with Client(api) as ak:
        seen: list[tuple[float, object]] = []
        start = time.monotonic()
        for event in ak.run_stream(["sh", "-c", script]):
            seen.append((time.monotonic() - start, event))
        events = [e for _, e in seen]
        assert isinstance(events[0], Started)
        assert events[1:] == [
            OutputEvent("stdout", "first\n"),
            OutputEvent("stderr", "second\n"),
            ExitEvent(7, None, False),
        ]
        first_at, exit_at = seen[1][0], seen[-1][0]
        print(f"\nrun/stream: first output at {first_at:.2f}s, exit at {exit_at:.2f}s (boot included)")
        assert exit_at - first_at >= 2.5

        with ak.create_sandbox() as box:
            start = time.monotonic()
            times = {}
            for event in box.exec_stream(["sh", "-c", "echo a; sleep 2; echo b"]):
                if isinstance(event, OutputEvent | ExitEvent):
                    times[event.data if isinstance(event, OutputEvent) else "exit"] = time.monotonic() - start
            first, end = times["a\n"], times["exit"]
            print(f"exec/stream: first output at {first:.3f}s, exit at {end:.3f}s")
            assert times["exit"] - times["a\n"] >= 1.5


def test_other_requests_are_served_while_commands_run(api: str) -> None:
    """Many concurrent commands share one agent connection; health and listing never wait for them."""
    with Client(api) as ak, ak.create_sandbox() as box:

        def job(i: int) -> str:
            return box.exec(["sh", "-c", f"sleep 2; echo job{i}"]).stdout

        with ThreadPoolExecutor(8) as pool:
            start = time.monotonic()
            jobs = [pool.submit(job, i) for i in range(8)]  # more than the sandbox's 4 agent ports
            time.sleep(0.5)
            quick = time.monotonic()
            assert ak.health()["status"] == "ok"
            assert [s.name for s in ak.list_sandboxes()] == [box.name]
            assert box.exec(["echo", "meanwhile"]).stdout == "meanwhile\n"
            answered = time.monotonic() - quick
            assert [j.result() for j in jobs] == [f"job{i}\n" for i in range(8)]
            elapsed = time.monotonic() - start
        print(f"\n8 concurrent 2 s commands took {elapsed:.2f}s; other requests meanwhile {answered:.2f}s")
        assert answered < 1.5
        assert elapsed < 6


def test_leaving_a_stream_kills_its_command(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox() as box:
        events = box.exec_stream(["sh", "-c", "echo started; exec sleep 300"])
        for event in events:
            if isinstance(event, OutputEvent):
                break
        assert "sleep 300" in box.exec(["ps"]).stdout
        events.close()  # the HTTP response closes with the generator
        deadline = time.monotonic() + 20
        while "sleep 300" in box.exec(["ps"]).stdout:
            assert time.monotonic() < deadline, "the command outlived its stream"
            time.sleep(0.2)


def test_attach_over_websocket(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox() as box:
        with box.attach(["sh"], rows=30, cols=100) as term:
            term.send("stty size; echo A$((6 * 7))B\n")
            output = b""
            for chunk in term:
                output += chunk
                if b"A42B" in output and b"30 100" in output:
                    break
            term.resize(40, 120)
            term.send("stty size; exit 3\n")
            assert b"40 120" in b"".join(term)
            assert term.exit == ExitEvent(3, None, False)
        with pytest.raises(ApiError) as missing:
            Sandbox(ak, dataclasses.replace(box.info, name="nope"), owned=False).attach()
        assert (missing.value.status, missing.value.code) == (404, "sandbox_not_found")


def test_async_client(api: str) -> None:
    async def main() -> None:
        async with AsyncClient(api) as ak:
            async with await ak.create_sandbox(image="base") as box:
                done = await box.exec(["sh", "-c", "echo $X"], env={"X": "async"})
                assert done.stdout == "async\n"
                events = [e async for e in box.exec_stream(["sh", "-c", "echo one; echo two >&2"])]
                assert events[1:] == [
                    OutputEvent("stdout", "one\n"),
                    OutputEvent("stderr", "two\n"),
                    ExitEvent(0, None, False),
                ]
                await box.write_file("/tmp/f", b"abc")
                assert await box.read_file("/tmp/f") == b"abc"
                async with await box.attach(["cat"]) as term:
                    await term.send(b"echo\n")
                    await term.eof()
                    assert b"echo" in b"".join([c async for c in term])
                    assert term.exit == ExitEvent(0, None, False)
            assert await ak.list_sandboxes() == []

    asyncio.run(asyncio.wait_for(main(), 120))


def test_api_key_required(cli_home: Path, tmp_path: Path) -> None:
    with api_server(tmp_path, api_key="s3cret") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            denied = httpx.get(f"{url}/sandboxes", headers=headers)
            assert denied.status_code == 401
            assert denied.headers["content-type"] == "application/problem+json"
            assert denied.json()["code"] == "unauthorized"
        with pytest.raises(ApiError) as unauthorized:
            Client(url, api_key="wrong").list_sandboxes()
        assert unauthorized.value.status == 401
        with Client(url, api_key="s3cret") as ak, ak.create_sandbox() as box:
            assert box.exec(["echo", "ok"]).stdout == "ok\n"
            with Client(url, api_key="wrong") as intruder, pytest.raises(ApiError) as ws_denied:
                Sandbox(intruder, box.info, owned=False).attach()
            assert (ws_denied.value.status, ws_denied.value.code) == (401, "unauthorized")
            assert ak._request("GET", "/openapi.json").json()["info"]["title"] == "agentkernel"


def test_broken_off_upload_leaves_no_partial_file(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox() as box:

        def breaks_off() -> Iterator[bytes]:
            for _ in range(8):
                yield b"x" * (1 << 20)
            raise RuntimeError("the client gives up")

        with pytest.raises(RuntimeError):
            box.write_file("/root/partial.bin", breaks_off())
        deadline = time.monotonic() + 10
        while box.exec(["ls", "-a", "/root"]).stdout.split() != [".", ".."]:
            assert time.monotonic() < deadline, "a partial upload was left behind"
            time.sleep(0.2)
        assert box.exec(["echo", "still fine"]).stdout == "still fine\n"
