"""The host side of the protocol against guests that break it, each in a process of its own.

Every case checks three things: the host fails with a clear AgentkernelError (never another exception
type, never a hang), it holds bounded memory while the guest misbehaves (tracemalloc, this process
only), and a well-behaved guest served over another connection in the same event loop is unaffected.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentkernel.errors import AgentConnectionError, AgentkernelError
from agentkernel.protocol import connection
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import INITIAL_WINDOW, MAX_PAYLOAD
from tests.hostile.conftest import Guests, steady_work

pytestmark = pytest.mark.usefixtures("traced")

HANG = 60.0
"""Far longer than any case takes: reaching it means the host hung."""

BOUND = 8 * MAX_PAYLOAD
"""Host memory a misbehaving connection may cost: a frame being decoded and its copy, the stream
reader's buffer and one socket read, the frames decoded from one read, and per channel one window of
unread data and its copy as it is taken (plus the steady connection's little)."""

Work = Callable[[Connection], Awaitable[object]]


@dataclass(frozen=True)
class Outcome:
    error: AgentkernelError | None
    seconds: float
    peak: int
    steady_rounds: int


async def _hostile(sock: Path, good: Path, work: Work) -> Outcome:
    async with await Connection.open_unix(good, shared_stream=True) as steady:
        await steady.hello(timeout=10)
        stop = asyncio.Event()
        rounds = asyncio.create_task(steady_work(steady, stop))
        gc.collect()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        start = time.monotonic()
        error = None
        try:
            async with await Connection.open_unix(sock, shared_stream=True) as conn:
                await asyncio.wait_for(work(conn), HANG)
        except AgentkernelError as exc:
            error = exc
        except TimeoutError:
            pytest.fail(f"the host hung: no error within {HANG:g}s")
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        stop.set()
        steady_rounds = await asyncio.wait_for(rounds, HANG)
        assert not steady.broken
        assert (await steady.run(["echo", "after"])).stdout == b"after\n"
    print(f"{error!r} after {seconds:.2f}s, host peak +{peak / 1024:.0f} KiB")
    return Outcome(error, seconds, peak, steady_rounds)


def hostile(guests: Guests, behaviour: str, work: Work, *, collected: int = 0) -> Outcome:
    """Run `work` against the guest; `collected`: bytes of output that `work` itself keeps."""
    sock, good = guests(behaviour), guests("good")
    outcome = asyncio.run(_hostile(sock, good, work))
    assert outcome.peak < BOUND + collected, f"the host held {outcome.peak} bytes"
    assert outcome.steady_rounds >= 1
    return outcome


async def exec_and_wait(conn: Connection) -> None:
    await conn.hello(timeout=10)
    proc = await conn.exec(["anything"])
    await proc.wait()


async def exec_unread(conn: Connection) -> None:
    """A command whose output nobody reads (a slow client): the host must still hold it bounded."""
    await conn.hello(timeout=10)
    proc = await conn.exec(["anything"])
    while not conn.broken:
        await asyncio.sleep(0.01)
    await proc.wait()  # what arrived before the violation, then the violation
    raise conn.failure()


def test_oversized_frame(guests: Guests) -> None:
    outcome = hostile(guests, "oversized", exec_and_wait)
    assert isinstance(outcome.error, AgentConnectionError)
    assert f"frame of {64 * MAX_PAYLOAD} bytes exceeds the {MAX_PAYLOAD}-byte limit" in str(outcome.error)


def test_frame_on_a_channel_that_is_not_open(guests: Guests) -> None:
    outcome = hostile(guests, "unknown-channel", exec_and_wait)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "frame for channel 1001, which is not open" in str(outcome.error)


def test_flood_beyond_the_window_while_nobody_reads(guests: Guests) -> None:
    outcome = hostile(guests, "flood", exec_unread)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "sent more data than its window allows" in str(outcome.error)


def test_flood_into_a_reader_stops_at_its_limit(guests: Guests) -> None:
    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        await conn.run(["anything"], limit=1 << 20)

    outcome = hostile(guests, "flood", work, collected=1 << 20)
    assert str(outcome.error) == f"command stdout exceeds {1 << 20} bytes"


def test_one_byte_frames_cost_no_more_than_their_window(guests: Guests) -> None:
    """Legal, but the most frames a window allows: unread, they must cost about their bytes."""

    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        proc = await conn.exec(["tiny"])
        await conn.run(["echo", "after"])  # answered once all of the tiny frames have arrived
        output = bytearray()
        async for chunk in proc.output():
            output += chunk.data
        assert output == b"t" * INITIAL_WINDOW

    assert hostile(guests, "tiny-frames", work).error is None


def test_empty_output_frames(guests: Guests) -> None:
    outcome = hostile(guests, "empty-frames", exec_unread)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "empty STDOUT" in str(outcome.error)


def test_flood_of_frames_no_window_bounds(guests: Guests) -> None:
    outcome = hostile(guests, "control-flood", exec_unread)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "INFO frame on channel 1" in str(outcome.error)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("started-twice", "second STARTED frame on channel 1"),
        ("after-exit", "STDOUT frame on channel 1 after its end"),
    ],
)
def test_frames_beyond_what_an_exec_answers(guests: Guests, behaviour: str, message: str) -> None:
    outcome = hostile(guests, behaviour, exec_unread)
    assert str(outcome.error) == f"the sandbox agent broke the protocol: {message}"


def test_garbage_instead_of_hello_on_a_port(guests: Guests) -> None:
    """On a port the host skips what precedes a HELLO, in bounded memory, until its timeout."""

    async def work(conn: Connection) -> None:
        await conn.hello(timeout=3)

    outcome = hostile(guests, "garbage", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert str(outcome.error) == "the agent did not answer within 3s"
    assert outcome.seconds >= 3


def test_garbage_after_hello(guests: Guests) -> None:
    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        while True:
            await conn.ping()

    outcome = hostile(guests, "garbage-after-hello", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert str(outcome.error).startswith("the sandbox agent broke the protocol: ")


@pytest.mark.parametrize("behaviour", ["silent", "deaf"])
def test_no_answer_to_hello(guests: Guests, behaviour: str) -> None:
    """Past RESYNC_AFTER the host also sends its 256 KiB of resync zeros, which a deaf guest never reads."""

    async def work(conn: Connection) -> None:
        await conn.hello(timeout=7)

    outcome = hostile(guests, behaviour, work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert str(outcome.error) == "the agent did not answer within 7s"
    assert outcome.seconds >= 7


def test_no_answer_to_exec(guests: Guests) -> None:
    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        assert await conn.ping() >= 0  # the guest is there: only the EXEC goes unanswered
        await conn.exec(["anything"], start_timeout=2)

    outcome = hostile(guests, "silent-exec", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert str(outcome.error) == "the agent did not start the command within 2s"
    assert outcome.seconds >= 2


def test_command_that_outlives_its_timeout(guests: Guests, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest enforces `timeout`; one that does not is given up on TIMEOUT_GRACE after it."""
    monkeypatch.setattr(connection, "TIMEOUT_GRACE", 1.0)

    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        await conn.run(["anything"], timeout=1)

    outcome = hostile(guests, "no-exit", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert str(outcome.error) == "the agent did not end the command within 1s of its timeout"
    assert outcome.seconds >= 2


def test_answers_to_repeated_hellos_are_not_taken_for_later_replies(guests: Guests) -> None:
    async def body() -> None:
        async with await Connection.open_unix(guests("double-hello"), shared_stream=True) as conn:
            await conn.hello(timeout=10)
            await asyncio.sleep(0.2)  # the second answer arrives
            assert await conn.ping() >= 0
            assert (await conn.run(["echo", "fine"])).stdout == b"fine\n"

    asyncio.run(asyncio.wait_for(body(), HANG))


def test_arguments_are_sent_as_the_bytes_they_came_from(guests: Guests) -> None:
    """Not hostile, but input the host must not choke on: arguments that were not UTF-8 (Python holds
    their bytes as lone surrogates) and timeouts that are no number of seconds."""

    async def body() -> None:
        async with await Connection.open_unix(guests("good"), shared_stream=True) as conn:
            await conn.hello(timeout=10)
            assert (await conn.run(["echo", "caf\udce9"])).stdout == b"caf\xe9\n"
            for timeout in (float("nan"), -1.0, float("inf")):
                with pytest.raises(AgentkernelError, match="the timeout must be from 0 to"):
                    await conn.exec(["echo"], timeout=timeout)
            assert (await conn.run(["echo", "still"])).stdout == b"still\n"

    asyncio.run(asyncio.wait_for(body(), HANG))
