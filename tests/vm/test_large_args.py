"""Commands whose arguments and environment do not fit one frame, up to Linux's execve limits and past
them: on a real VM through the protocol, and through the real CLI, HTTP API and MCP server."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mcp import Client

from agentkernel.errors import ArgumentsTooLongError
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import (
    ARG_MAX,
    ARG_POINTER,
    MAX_ARG_STRLEN,
    FrameType,
    Tag,
    decode_record,
    encode_record,
)
from tests.api.server import api_server
from tests.conftest import cli
from tests.mcp.test_mcp_server import error_text, ok, with_server
from tests.vm.conftest import BootedVM, connected, run_async

pytestmark = pytest.mark.vm

# Prints how many arguments it got and a checksum of them, one per line.
COUNT_AND_SUM = ["sh", "-c", 'echo $#; printf "%s\\n" "$@" | sha256sum', "sh"]
MIB = 1 << 20


def cost(strings: list[str]) -> int:
    """What the strings count against ARG_MAX."""
    return sum(len(s.encode()) + 1 + ARG_POINTER for s in strings)


def many_args(total: int, size: int = 120) -> list[str]:
    """Distinct arguments that count about `total` bytes against ARG_MAX."""
    return [f"{i:08d}".ljust(size, "a") for i in range(total // (size + 1 + ARG_POINTER))]


def checksum(lines: list[str]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def big_env(total: int = MIB, size: int = 100 << 10) -> dict[str, str]:
    return {f"BIG_{i}": chr(ord("a") + i) * size for i in range(total // size)}


Fields = list[tuple[Tag, int | bytes | str]]


async def answer_to(conn: Connection, frames: list[tuple[FrameType, Fields]]) -> int | None:
    """The errno of the ERROR that answers raw EXEC, ARGS and SIGNAL frames sent past the host's
    checks on a new channel."""
    channel = conn._open_channel(FrameType.EXEC)
    for ftype, fields in frames:
        await conn.send(channel.id, ftype, encode_record(fields))
    frame = await asyncio.wait_for(channel.next(), 60)
    conn.release(channel)
    assert frame.type is FrameType.ERROR
    return decode_record(frame.payload).int(Tag.ERRNO)


def test_large_arguments_on_a_vm(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            args = many_args(MIB)
            done = await conn.run([*COUNT_AND_SUM, *args])
            assert done.stdout.decode().split()[:2] == [str(len(args)), checksum(args)]

            env = big_env()
            done = await conn.run(["sh", "-c", "env | grep ^BIG_ | sort | sha256sum"], env=env)
            assert done.stdout.split()[0].decode() == checksum(sorted(f"{k}={v}" for k, v in env.items()))

            # Up to the limit (less what the kernel adds: the program's path, the default PATH).
            near = many_args(ARG_MAX - 4096 - cost(COUNT_AND_SUM), size=1000)
            done = await conn.run([*COUNT_AND_SUM, *near])
            assert done.stdout.decode().split() == [str(len(near)), checksum(near), "-"]
            longest = "x" * (MAX_ARG_STRLEN - 1)
            done = await conn.run(["sh", "-c", "echo ${#1} ${#L}", "sh", longest], env={"L": longest[2:]})
            assert done.stdout == f"{len(longest)} {len(longest) - 2}\n".encode()

            # Past it: refused on the host, nothing sent, the connection fine.
            with pytest.raises(ArgumentsTooLongError, match=r"204800 bytes.*131071.*MAX_ARG_STRLEN"):
                await conn.exec(["echo", "y" * (200 << 10)])
            with pytest.raises(ArgumentsTooLongError, match=r"at most 2097152 \(ARG_MAX"):
                await conn.exec(["echo", *many_args(ARG_MAX + 1000)])
            # At ARG_MAX exactly the host sends it, and the guest's execve refuses it (the path counts).
            exact = many_args(ARG_MAX - cost(["/bin/true", "z"]), size=1000)
            exact.append("z" * (ARG_MAX - cost(["/bin/true", *exact]) - 1 - ARG_POINTER))
            assert cost(["/bin/true", *exact]) == ARG_MAX
            with pytest.raises(ArgumentsTooLongError, match="the guest refused") as refused:
                await conn.exec(["/bin/true", *exact])
            assert refused.value.errno == errno.E2BIG

            # The agent bounds what it holds for one EXEC, whatever the host sends.
            start: tuple[FrameType, Fields] = (FrameType.EXEC, [(Tag.ARGV, b"true"), (Tag.CONTINUED, 1)])
            chunk: Fields = [(Tag.ARGV, b"a" * 100_000), (Tag.ARGV, b"a" * 100_000), (Tag.CONTINUED, 1)]
            over = [start, *[(FrameType.ARGS, chunk)] * 11, (FrameType.ARGS, [])]
            assert await answer_to(conn, over) == errno.E2BIG
            # A SIGNAL before the last ARGS ends the request: there is no process (and no kill(0)).
            assert await answer_to(conn, [start, (FrameType.SIGNAL, [(Tag.SIGNAL, 9)])]) == errno.ECANCELED
            assert (await conn.run(["echo", "still here"])).stdout == b"still here\n"

    run_async(body())


def raise_stack_limit() -> None:
    """Lets the CLI itself be given more than 2 MiB of arguments (Linux: a quarter of the stack)."""
    resource.setrlimit(resource.RLIMIT_STACK, (64 * MIB, resource.getrlimit(resource.RLIMIT_STACK)[1]))


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], *needles: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentkernel: error: "), stderr
    for needle in needles:
        assert needle in lines[0], stderr


def test_large_arguments_through_the_cli(cli_home: Path) -> None:
    assert cli("create", "box").returncode == 0
    assert cli("start", "box").returncode == 0
    args = many_args(MIB)
    result = cli("exec", "box", "--", *COUNT_AND_SUM, *args)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[:2] == [str(len(args)), checksum(args)]

    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    if hard != resource.RLIM_INFINITY and hard < 64 * MIB:
        pytest.skip("the stack's hard limit is too low to hand the CLI more than 2 MiB of arguments")
    # One argument over 128 KiB cannot reach the CLI (the host's execve refuses it); more than
    # ARG_MAX in all can, with a larger stack.
    over = many_args(ARG_MAX + 100_000)
    for command in (["exec", "box"], ["run", "--no-pool"]):
        result = subprocess.run(
            [sys.executable, "-m", "agentkernel", *command, "--", "echo", *over],
            capture_output=True,
            timeout=600,
            preexec_fn=raise_stack_limit,
        )
        assert_one_line_error(result, "ARG_MAX", str(ARG_MAX))
    assert [s["name"] for s in json.loads(cli("list", "--json").stdout)] == ["box"]  # `run` booted none


def test_large_arguments_through_the_api(cli_home: Path, tmp_path: Path) -> None:
    with api_server(tmp_path) as url, httpx.Client(base_url=url, timeout=300) as http:
        assert http.post("/sandboxes", json={"name": "box"}).status_code == 201
        args = many_args(MIB)
        done = http.post("/sandboxes/box/exec", json={"command": [*COUNT_AND_SUM, *args]})
        assert done.status_code == 200, done.text
        assert done.json()["stdout"].split()[:2] == [str(len(args)), checksum(args)]

        def refused(path: str, body: dict[str, object], limit: str) -> None:
            response = http.post(path, json=body)
            assert response.status_code == 422, response.text
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert (problem["code"], problem["field"]) == ("arguments_too_long", "command")
            assert limit in problem["detail"]

        single = {"command": ["echo", "y" * (200 << 10)]}
        total = {"command": ["echo", *many_args(ARG_MAX + 1000)]}
        for path in ("/sandboxes/box/exec", "/run"):
            refused(path, single, "MAX_ARG_STRLEN")
            refused(path, total, "ARG_MAX")
        refused(
            "/sandboxes/box/exec", {"command": ["true"], "env": big_env(ARG_MAX + (100 << 10))}, "ARG_MAX"
        )
        assert [s["name"] for s in http.get("/sandboxes").json()] == ["box"]  # /run booted none


def test_large_arguments_through_mcp(cli_home: Path, tmp_path: Path) -> None:
    args = many_args(MIB)

    async def body(client: Client) -> None:
        ran = ok(await client.call_tool("run_command", {"command": [*COUNT_AND_SUM, *args]}))
        assert ran["stdout"].split()[:2] == [str(len(args)), checksum(args)]
        single = await client.call_tool("run_command", {"command": ["echo", "y" * (200 << 10)]})
        assert "MAX_ARG_STRLEN" in error_text(single) and "131071" in error_text(single)
        total = await client.call_tool("run_command", {"command": ["echo", *many_args(ARG_MAX + 1000)]})
        assert "ARG_MAX" in error_text(total) and str(ARG_MAX) in error_text(total)

    with_server(body, tmp_path)
