"""Background commands through the service, the HTTP API with the SDK (sync and async) and the MCP
server, on the fake backend (its guest keeps RING bytes of each command's output)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client as McpClient

from agentkernel.api.commands import _Text
from agentkernel.client import ApiError, AsyncClient, Client, ExitEvent
from agentkernel.errors import BackgroundCommandError, InvalidRequestError
from agentkernel.mcp_server.server import build_server
from agentkernel.protocol.connection import BackgroundOutput
from agentkernel.service.commands import parse_signal
from agentkernel.service.request import SandboxFlags
from agentkernel.service.service import CommandSpec, SandboxService
from tests.fakes.guest import RING

MAX = 1 << 20


def test_sdk_sync_background_command_outlives_its_client(api: str) -> None:
    with Client(api) as ak:
        box = ak.create_sandbox("box", image="base")
        handle = box.run(["sh", "-c", "echo one; sleep 0.3; echo two >&2; exit 3"], background=True)
        assert handle.id >= 1 and handle.pid > 0
    with Client(api) as again:  # a new client, as after a restart: the command ran on
        box = again.sandbox("box")
        assert [c.id for c in box.list_commands()] == [handle.id]
        handle = box.connect_command(handle.id)
        chunks = list(handle)
        assert "".join(c.data for c in chunks) == "one\ntwo\n"
        assert chunks[0].offset == 0 and chunks[-1].next_offset == 8
        assert handle.exit == ExitEvent(3, None, False)
        assert handle.wait() == ExitEvent(3, None, False)
        info = handle.info()
        assert (info.state, info.output_bytes, info.exit) == ("exited", 8, ExitEvent(3, None, False))
        # from an offset, and without following
        assert [c.data for c in handle.output(offset=4, follow=False)] == ["two\n"]
        assert not handle.kill()  # it had exited
        box.remove(force=True)


def test_sdk_sync_stdin_kill_and_callbacks(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box", image="base") as box:
        cat = box.run(["cat"], background=True)
        cat.send_stdin("hello ")
        cat.send_stdin(b"world")
        cat.close_stdin()
        seen: list[str] = []
        assert cat.wait(on_output=seen.append) == ExitEvent(0, None, False)
        assert "".join(seen) == "hello world"
        with pytest.raises(ApiError) as closed:
            cat.send_stdin("late")
        assert (closed.value.status, closed.value.code) == (409, "stdin_closed")

        sleeper = box.run(["sh", "-c", "echo awake; sleep 60"], background=True)
        reading = sleeper.output()
        assert next(reading).data == "awake\n"
        reading.close()  # a reader that leaves stops reading, not the command
        assert sleeper.info().state == "running"
        assert sleeper.kill("TERM")
        assert sleeper.wait() == ExitEvent(None, 15, False)

        fed = box.run(["cat"], background=True, stdin="given", on_stdout=seen.append)
        seen.clear()
        assert fed.wait().exit_code == 0 and "".join(seen) == "given"

        timed = box.run(["sleep", "60"], background=True, timeout=0.2)
        assert timed.wait() == ExitEvent(None, 9, True)

        with pytest.raises(ApiError) as unknown:
            box.connect_command(999)
        assert (unknown.value.status, unknown.value.code) == (404, "background_command_not_found")
        with pytest.raises(ApiError) as missing:
            box.run(["no-such-program"], background=True)
        assert missing.value.status == 422


def test_output_overflow_is_marked(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box", image="base") as box:
        handle = box.run(["emit", str(RING + 1000)], background=True)
        handle.wait()
        chunks = list(handle.output())
        assert chunks[0].lost == 1000 and chunks[0].offset == 1000
        assert sum(len(c.data) for c in chunks) == RING
        assert box.list_commands()[0].output_lost == 1000


def test_api_routes_and_problems(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box", image="base"):
        with httpx.Client(base_url=api) as http:
            started = http.post("/sandboxes/box/commands", json={"command": ["cat"]})
            assert started.status_code == 201
            cid = started.json()["id"]
            assert http.post(f"/sandboxes/box/commands/{cid}/stdin", content=b"\xc3").status_code == 204
            assert (
                http.post(f"/sandboxes/box/commands/{cid}/stdin?eof=true", content=b"\xa9!").status_code
                == 204
            )
            assert http.post(f"/sandboxes/box/commands/{cid}/wait").json() == {
                "exit_code": 0,
                "signal": None,
                "timed_out": False,
            }
            stream = http.get(f"/sandboxes/box/commands/{cid}/output")
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _sse(stream.text)
            assert ("output", {"offset": 0, "next_offset": 3, "data": "é!", "lost": 0}) in events
            assert events[-1] == ("exit", {"exit_code": 0, "signal": None, "timed_out": False, "offset": 3})

            gone = http.post(f"/sandboxes/box/commands/{cid}/signal", json={"signal": "TERM"})
            assert (gone.status_code, gone.json()["code"]) == (409, "background_command_exited")
            bad = http.post(f"/sandboxes/box/commands/{cid}/signal", json={"signal": "NOPE"})
            assert (bad.status_code, bad.json()["field"]) == (422, "signal")
            typo = http.post("/sandboxes/box/commands", json={"command": ["cat"], "timout": 3})
            assert typo.status_code == 422
            assert http.get("/sandboxes/box/commands/77").status_code == 404
            assert http.get("/sandboxes/nobody/commands").status_code == 404
        spec = httpx.get(f"{api}/openapi.json").json()["paths"]
        for path in ("/commands", "/commands/{command_id}/output", "/commands/{command_id}/wait"):
            assert f"/sandboxes/{{name}}{path}" in spec


def test_exec_route_starts_a_background_command(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box", image="base"), httpx.Client(base_url=api) as http:
        started = http.post(
            "/sandboxes/box/exec", json={"command": ["cat"], "stdin": "fed", "background": True}
        )
        assert started.status_code == 201
        cid = started.json()["id"]
        assert started.json()["pid"] > 0
        # its stdin was given and closed, so cat ends on its own
        waited = http.post(f"/sandboxes/box/commands/{cid}/wait").json()
        assert waited == {"exit_code": 0, "signal": None, "timed_out": False}
        assert [c["id"] for c in http.get("/sandboxes/box/commands").json()] == [cid]
        assert ("output", {"offset": 0, "next_offset": 3, "data": "fed", "lost": 0}) in _sse(
            http.get(f"/sandboxes/box/commands/{cid}/output").text
        )
        foreground = http.post("/sandboxes/box/exec", json={"command": ["cat"], "stdin": "x"})
        assert (foreground.status_code, foreground.json()["stdout"]) == (200, "x")
        run = http.post("/run", json={"command": ["true"], "background": True})
        assert run.status_code == 422  # a one-off run has nothing to leave running in
        spec = http.get("/openapi.json").json()
        exec_responses = spec["paths"]["/sandboxes/{name}/exec"]["post"]["responses"]
        assert exec_responses["201"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Started"
        }


def test_output_text_keeps_characters_whole_and_offsets_exact() -> None:
    text = _Text(10)
    assert text.add(BackgroundOutput(10, b"a\xc3")) == [
        {"offset": 10, "next_offset": 11, "data": "a", "lost": 0}
    ]
    assert text.add(BackgroundOutput(12, b"\xa9b")) == [
        {"offset": 11, "next_offset": 14, "data": "éb", "lost": 0}
    ]
    # a gap after half a character: that half is shown (replaced) on its own, then what follows
    assert text.add(BackgroundOutput(14, b"\xc3")) == []
    assert text.add(BackgroundOutput(20, b"c", lost=5)) == [
        {"offset": 14, "next_offset": 15, "data": "\ufffd", "lost": 0},
        {"offset": 20, "next_offset": 21, "data": "c", "lost": 5},
    ]
    assert text.flush() is None


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_sdk_async(api: str) -> None:
    async def main() -> None:
        async with AsyncClient(api) as ak, ak.create_sandbox("box", image="base") as box:
            handle = await box.run(["sh", "-c", "echo a; sleep 0.2; echo b"], background=True)
            assert [c.id for c in await box.list_commands()] == [handle.id]
            again = await box.connect_command(handle.id)
            seen: list[str] = []

            async def collect(text: str) -> None:
                seen.append(text)

            assert await again.wait(on_output=collect) == ExitEvent(0, None, False)
            assert "".join(seen) == "a\nb\n"
            assert "".join([c.data async for c in handle]) == "a\nb\n"
            cat = await box.run(["cat"], background=True)
            await cat.send_stdin("x")
            await cat.close_stdin()
            assert (await cat.wait()).exit_code == 0
            assert not await cat.kill()
            sleeper = await box.run(["sleep", "60"], background=True)
            assert await sleeper.kill()
            assert (await sleeper.wait()).signal == 9
            assert (await sleeper.info()).state == "exited"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_service_checks_and_sandbox_end(tmp_path: Path) -> None:
    assert (parse_signal("term"), parse_signal("SIGKILL"), parse_signal(2), parse_signal("1")) == (
        15,
        9,
        2,
        1,
    )
    for bad in ("SIG_DFL", "NOPE", "999", ""):
        with pytest.raises(InvalidRequestError):
            parse_signal(bad)

    async def main() -> None:
        async with SandboxService(tmp_path) as service:
            with pytest.raises(InvalidRequestError) as bad:  # the input first, then the sandbox
                await service.signal_command("nobody", 1, "NOPE")
            assert bad.value.field == "signal"
            request = await service.resolve(SandboxFlags(image="base"))
            await service.create(request, name="box")
            started = await service.start_command("box", CommandSpec.checked(["sleep", "60"]))
            with pytest.raises(InvalidRequestError):
                await service.command_info("box", 0)
            with pytest.raises(InvalidRequestError):
                await service.command_output("box", started.id, offset=-1)
            await service.stop("box")  # background commands end with the sandbox
            await service.start("box")
            with pytest.raises(BackgroundCommandError) as gone:
                await service.command_info("box", started.id)
            assert gone.value.status == 404

    asyncio.run(asyncio.wait_for(main(), 60))


def test_mcp_tools(tmp_path: Path) -> None:
    async def main() -> None:
        async with McpClient(build_server(tmp_path)) as client:

            async def call(tool: str, **arguments: Any) -> dict[str, Any]:
                result = await client.call_tool(tool, arguments)
                assert not result.is_error, result.content
                assert isinstance(result.structured_content, dict)
                return result.structured_content

            await call("create_sandbox", name="box", image="base")
            started = await call("start_command", name="box", command="cat; echo done")
            cid = started["id"]
            await call("send_command_input", name="box", id=cid, input="typed\n", eof=True)
            ended = await call("wait_command", name="box", id=cid)
            assert (ended["running"], ended["exit_code"]) == (False, 0)
            out = await call("read_command_output", name="box", id=cid)
            assert (out["output"], out["next_offset"], out["running"]) == ("typed\ndone\n", 11, False)
            listed = await call("list_commands", name="box")
            assert [c["id"] for c in listed["commands"]] == [cid]

            big = await call("start_command", name="box", command=["emit", "20000"])
            await call("wait_command", name="box", id=big["id"])
            capped = await call("read_command_output", name="box", id=big["id"], output_limit=1000)
            assert capped["truncated"] and len(capped["output"]) < 1200
            assert f'read_command_output(name="box", id={big["id"]}, offset=500)' in capped["output"]

            overflowed = await call("start_command", name="box", command=["emit", str(RING + 100)])
            await call("wait_command", name="box", id=overflowed["id"])
            kept = await call("read_command_output", name="box", id=overflowed["id"], output_limit=MAX)
            assert (kept["lost"], kept["offset"], kept["next_offset"]) == (100, 100, RING + 100)
            assert kept["output"].startswith("[... 100 bytes before this are lost")

            sleeper = await call("start_command", name="box", command=["sleep", "60"])
            still = await call("wait_command", name="box", id=sleeper["id"], timeout=0.2)
            assert still["running"]
            await call("kill_command", name="box", id=sleeper["id"], signal="KILL")
            assert (await call("wait_command", name="box", id=sleeper["id"]))["signal"] == 9

            refused = await client.call_tool("kill_command", {"name": "box", "id": sleeper["id"]})
            assert refused.is_error and "has exited" in str(refused.content)
            unknown = await client.call_tool("read_command_output", {"name": "box", "id": 404})
            assert unknown.is_error and "list_commands" in str(unknown.content)

    asyncio.run(asyncio.wait_for(main(), 60))
