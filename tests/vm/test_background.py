"""Background commands on a real VM: they outlive the connection that started them, keep their output
in a bounded ring that any later connection reads from the start, take stdin and signals, and are
waited for; and a command that cannot start says what is missing."""

from __future__ import annotations

import asyncio
import errno
import signal

import pytest

from agentkernel.errors import BackgroundCommandError, ExecError, WorkingDirectoryError
from agentkernel.protocol import connection
from agentkernel.protocol.connection import Attachment, Connection, ExitStatus
from tests.vm.conftest import BootedVM, connected, run_async

pytestmark = pytest.mark.vm

RING = 1 << 20
MAX_KEPT = 64


async def read_all(attachment: Attachment) -> tuple[bytes, int]:
    """All output an attachment yields, and the bytes it said were lost."""
    out, lost = bytearray(), 0
    async for chunk in attachment.output():
        assert chunk.offset == attachment.offset
        lost += chunk.lost
        out += chunk.data
    return bytes(out), lost


async def until_written(conn: Connection, cmd_id: int, size: int) -> None:
    """Wait until the command has written `size` bytes of output."""
    for _ in range(600):
        if any(c.id == cmd_id and c.output_size >= size for c in await conn.list_background()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"command {cmd_id} did not write {size} bytes")


def test_background_commands(vm: BootedVM) -> None:
    async def body() -> None:
        script = "echo out; echo err >&2; read line; echo got $line; exit 3"
        async with connected(vm) as conn:
            cmd = await conn.exec_background(["sh", "-c", script], cwd="/tmp", env={"X": "1"})
            assert cmd.id > 0 and cmd.pid > 1
        # The connection that started it is gone; the command is not.
        async with connected(vm) as conn:
            [info] = [c for c in await conn.list_background() if c.id == cmd.id]
            assert info.running and info.status is None and info.argv == ["sh", "-c", script]
            assert info.pid == cmd.pid and info.started_ns > 0
            await until_written(conn, cmd.id, 8)
            # What it wrote so far, from the start, without waiting for more.
            attachment = await conn.attach_background(cmd.id, follow=False)
            assert await read_all(attachment) == (b"out\nerr\n", 0)
            assert attachment.status is None and attachment.offset == 8
            # A reader that follows it, started before it ends, sees the rest live.
            live = await conn.attach_background(cmd.id, offset=4)
            await conn.write_background(cmd.id, b"hello\n")
            assert await read_all(live) == (b"err\ngot hello\n", 0)
            assert live.status == ExitStatus(3, None, False)
            assert await conn.wait_background(cmd.id) == ExitStatus(3, None, False)
        async with connected(vm) as conn:
            # Ended, still kept: read again from the start, in the order it was written.
            again = await conn.attach_background(cmd.id)
            assert await read_all(again) == (b"out\nerr\ngot hello\n", 0)
            [info] = [c for c in await conn.list_background() if c.id == cmd.id]
            assert not info.running and info.status == ExitStatus(3, None, False)
            assert (info.output_size, info.output_lost) == (18, 0)
            with pytest.raises(BackgroundCommandError, match="has exited") as exited:
                await conn.signal_background(cmd.id, signal.SIGTERM)
            assert (exited.value.status, exited.value.code) == (409, "background_command_exited")
            with pytest.raises(BackgroundCommandError, match="its stdin is closed"):
                await conn.write_background(cmd.id, b"late\n")

            # stdin to the end of file, and signals to the process group.
            cat = await conn.exec_background(["cat"])
            await conn.write_background(cat.id, b"a" * 100_000, eof=True)
            assert await conn.wait_background(cat.id) == ExitStatus(0, None, False)
            assert await read_all(await conn.attach_background(cat.id)) == (b"a" * 100_000, 0)
            sleeper = await conn.exec_background(["sh", "-c", "sleep 600 & sleep 600"])
            await conn.signal_background(sleeper.id, signal.SIGTERM)
            assert await conn.wait_background(sleeper.id) == ExitStatus(None, signal.SIGTERM, False)
            limited = await conn.exec_background(["sleep", "600"], timeout=0.5)
            assert await conn.wait_background(limited.id) == ExitStatus(None, signal.SIGKILL, True)

            with pytest.raises(BackgroundCommandError, match="no background command 99999") as unknown:
                await conn.wait_background(99999)
            assert (unknown.value.status, unknown.value.code) == (404, "background_command_not_found")

    run_async(body())


def test_output_over_the_ring_is_marked_lost(vm: BootedVM) -> None:
    async def body() -> None:
        size = RING + RING // 2
        async with connected(vm) as conn:
            cmd = await conn.exec_background(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo END"])
            await conn.wait_background(cmd.id)
            [info] = [c for c in await conn.list_background() if c.id == cmd.id]
            assert (info.output_size, info.output_lost) == (size + 4, size + 4 - RING)
            attachment = await conn.attach_background(cmd.id)
            first = None
            out = bytearray()
            async for chunk in attachment.output():
                first = first or chunk
                out += chunk.data
            assert first is not None and (first.offset, first.lost) == (size + 4 - RING, size + 4 - RING)
            assert len(out) == RING and out.endswith(b"xEND\n")
            # An offset past what was lost reads from there.
            later = await conn.attach_background(cmd.id, offset=size)
            assert await read_all(later) == (b"END\n", 0)

    run_async(body())


def test_the_guest_keeps_a_bounded_number_of_commands(vm: BootedVM) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            first = await conn.exec_background(["true"])
            await conn.wait_background(first.id)
            running = [await conn.exec_background(["sleep", "600"]) for _ in range(MAX_KEPT - 1)]
            # Full: the one that ended makes room, and is forgotten.
            newest = await conn.exec_background(["sleep", "600"])
            ids = [c.id for c in await conn.list_background()]
            assert first.id not in ids and ids == [c.id for c in running] + [newest.id]
            with pytest.raises(ExecError, match="too many background commands: 64 kept") as full:
                await conn.exec_background(["true"])
            assert full.value.errno == errno.EAGAIN
            await conn.signal_background(running[0].id, signal.SIGKILL)
            await conn.wait_background(running[0].id)
            assert (await conn.exec_background(["true"])).id > newest.id
            for cmd in [*running[1:], newest]:
                await conn.signal_background(cmd.id, signal.SIGKILL)

    run_async(body())


async def start_error(conn: Connection, how: str, argv: list[str], cwd: str | None = None) -> ExecError:
    with pytest.raises(ExecError) as caught:
        if how == "background":
            await conn.exec_background(argv, cwd=cwd)
        else:
            await conn.exec(argv, cwd=cwd, pty=(24, 80) if how == "pty" else None)
    return caught.value


def test_a_start_that_fails_says_what_is_missing(vm: BootedVM, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        async with connected(vm) as conn:
            await conn.run(["sh", "-c", "printf '#!/nope/sh\\n' > /tmp/s; chmod +x /tmp/s; touch /tmp/f"])
            for how in ("foreground", "background", "pty"):
                missing = await start_error(conn, how, ["python4", "-c", "1"])
                assert str(missing) == "exec: python4: command not found"
                assert (missing.exit_code, missing.code) == (127, "command_not_found")
                assert missing.field == "command"
                nodir = await start_error(conn, how, ["ls"], cwd="/nope")
                assert isinstance(nodir, WorkingDirectoryError)
                assert str(nodir) == "cwd /nope: no such directory"
                assert (nodir.code, nodir.field) == ("invalid_cwd", "cwd")
                notdir = await start_error(conn, how, ["ls"], cwd="/tmp/f")
                assert str(notdir) == "cwd /tmp/f: not a directory"
                assert str(await start_error(conn, how, ["/bin/nope"])) == "exec: /bin/nope: no such file"
                noexec = await start_error(conn, how, ["/tmp/f"])
                assert (str(noexec), noexec.exit_code) == ("exec: /tmp/f: Permission denied", 126)
                interpreter = await start_error(conn, how, ["/tmp/s"])
                assert str(interpreter) == "exec: /tmp/s: its interpreter or loader is missing"
        # A host of protocol 2 is answered in protocol 2 by this agent.
        monkeypatch.setattr(connection, "VERSION", 2)
        async with connected(vm) as conn:
            assert conn.agent_version == 2
            assert (await conn.run(["echo", "old host"])).stdout == b"old host\n"

    run_async(body())
