"""The HTTP API's routes through the SDK (sync and async), on a real server over the fake backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time

import httpx
import pytest

from agentkernel.client import ApiError, AsyncClient, Client, ExitEvent, OutputEvent, Started
from agentkernel.service import sandboxes


def test_sandbox_routes_sync(api: str) -> None:
    with Client(api) as ak:
        assert ak.health()["status"] == "ok"
        with ak.create_sandbox("box", image="base") as box:
            assert (box.name, box.refresh().status, box.refresh().backend) == ("box", "running", "fake")
            assert [s.name for s in ak.list_sandboxes()] == ["box"]

            done = box.exec(
                ["sh", "-c", "echo $A in $PWD; echo oops >&2; exit 4"], env={"A": "x"}, cwd="/tmp"
            )
            assert (done.exit_code, done.stdout, done.stderr) == (4, "x in /tmp\n", "oops\n")
            assert box.exec(["cat"], stdin="typed").stdout == "typed"
            timed = box.exec(["sleep", "30"], timeout=0.2)
            assert timed.timed_out and timed.exit_code is None

            events = list(box.exec_stream(["echo", "streamed"]))
            assert isinstance(events[0], Started)
            assert OutputEvent("stdout", "streamed\n") in events and events[-1] == ExitEvent(0, None, False)

            assert box.write_file("/root/dir/a.txt", b"alpha", parents=True) == 5
            assert box.read_file("/root/dir/a.txt") == b"alpha"
            assert [(e.name, e.kind, e.size) for e in box.list_files("/root/dir")] == [("a.txt", "file", 5)]
            box.remove_file("/root/dir", recursive=True)
            with pytest.raises(ApiError) as missing:
                box.read_file("/root/dir/a.txt")
            assert missing.value.status == 404

            assert box.stop().status == "stopped"
            with pytest.raises(ApiError) as stopped:
                box.exec(["true"])
            assert stopped.value.status == 409
            assert box.start().status == "running"
        assert ak.list_sandboxes() == []  # leaving the block removed it


def test_errors_are_problems(api: str) -> None:
    with Client(api) as ak:
        with pytest.raises(ApiError) as unknown:
            ak.sandbox("nobody")
        assert (unknown.value.status, unknown.value.code) == (404, "sandbox_not_found")
        ak.create_sandbox("taken", start=False)
        with pytest.raises(ApiError) as taken:
            ak.create_sandbox("taken")
        assert taken.value.status == 409
        with pytest.raises(ApiError) as bad:
            ak.create_sandbox("not a name")
        assert bad.value.status == 422
        ak.sandbox("taken").start()
        with pytest.raises(ApiError) as no_program:
            ak.sandbox("taken").exec(["no-such-program"])
        assert (no_program.value.status, no_program.value.code) == (422, "command_not_found")
    problem = httpx.get(f"{api}/sandboxes/nobody")
    assert problem.status_code == 404 and problem.headers["content-type"] == "application/problem+json"


def test_run_removes_its_sandbox(api: str) -> None:
    with Client(api) as ak:
        seen: list[str] = []
        done = ak.run(["sh", "-c", "echo one; echo two"], on_stdout=seen.append)
        assert (done.exit_code, done.stdout) == (0, "one\ntwo\n") and "".join(seen) == "one\ntwo\n"
        assert ak.run(["false"]).exit_code == 1
        assert ak.list_sandboxes() == []


def test_sandbox_routes_async(api: str) -> None:
    async def main() -> None:
        async with AsyncClient(api) as ak:
            async with ak.create_sandbox(image="base") as box:
                assert (await ak.list_sandboxes())[0].name == box.name
                out: list[str] = []
                done = await box.exec(["emit", "100000"], on_stdout=out.append)
                assert done.stdout == "y" * 100000 and "".join(out) == done.stdout
                await box.write_file("/tmp/f", b"data")
                assert await box.read_file("/tmp/f") == b"data"
                assert "f" in [e.name for e in await box.list_files("/tmp")]
                async with box.attach(["cat"]) as term:
                    await term.send(b"typed\n")
                    await term.eof()
                    received = b"".join([chunk async for chunk in term])
                assert b"typed" in received
                assert (await box.stop()).status == "stopped"
            assert await ak.list_sandboxes() == []

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_sandbox_that_dies_under_an_exec_says_so(api: str) -> None:
    """The API's exec shares the server's agent connection: when the VMM dies under it, the error
    names the sandbox's end and its reason, as the CLI's does."""
    with Client(api) as ak, ak.create_sandbox("box", image="base") as box:
        pid = sandboxes.get(box.name).pid
        assert pid is not None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(box.exec, ["sleep", "30"])
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ApiError) as lost:
                running.result(timeout=20)
        assert lost.value.status == 502
        assert str(lost.value.detail) == (
            "sandbox 'box' failed: its VMM process ended without a shutdown (killed, or crashed)"
        )
