"""The host side of background commands and watches against guests that break the protocol, or
predate it."""

from __future__ import annotations

import asyncio

import pytest

from agentkernel.errors import AgentConnectionError, SandboxStateError
from agentkernel.protocol.connection import MAX_JOBS, STALLED_ATTACHES, Connection
from tests.hostile.conftest import Guests
from tests.hostile.test_hostile_guests import HANG, hostile

pytestmark = pytest.mark.usefixtures("traced")


def test_endless_list_of_background_commands(guests: Guests) -> None:
    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        await conn.list_background()

    outcome = hostile(guests, "jobs-flood", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert str(outcome.error) == (
        f"the sandbox agent broke the protocol: more than {MAX_JOBS} background commands listed"
    )


def test_attach_that_falls_behind_without_output_ends(guests: Guests) -> None:
    """An agent that says "fell behind, attach again" without ever sending output: the host would
    attach again for ever."""

    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        attachment = await conn.attach_background(1)
        async for _ in attachment.output():
            pass

    outcome = hostile(guests, "attach-stall", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "ATTACH keeps falling behind without sending output" in str(outcome.error)
    assert STALLED_ATTACHES < 100


def test_attach_flood_beyond_the_window_while_nobody_reads(guests: Guests) -> None:
    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        attachment = await conn.attach_background(1)
        while not conn.broken:
            await asyncio.sleep(0.01)
        async for _ in attachment.output():
            pass

    outcome = hostile(guests, "attach-flood", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "sent more data than its window allows" in str(outcome.error)


def test_watch_event_field_over_its_limit(guests: Guests) -> None:
    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        watch = await conn.watch("/w")
        async for _ in watch.events():
            pass

    outcome = hostile(guests, "watch-huge-field", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert (
        str(outcome.error) == "the sandbox agent broke the protocol: a WATCH event field of 1073741824 bytes"
    )


def test_an_older_agent_is_told_apart_before_anything_is_sent(guests: Guests) -> None:
    """An agent of protocol 2 would drop the connection on a frame type it does not know: the host
    refuses the request with a message that says what to do, and the connection goes on working."""

    async def body() -> None:
        async with await Connection.open_unix(guests("old-agent"), shared_stream=True) as conn:
            await conn.hello(timeout=10)
            assert conn.agent_version == 2
            calls = [
                conn.exec_background(["sleep", "1"]),
                conn.list_background(),
                conn.wait_background(1),
                conn.rename("/a", "/b"),
                conn.watch("/a"),
            ]
            for call in calls:
                with pytest.raises(
                    SandboxStateError,
                    match=r"\(protocol 2\) has no background commands, rename or watch",
                ):
                    await call
            assert (await conn.run(["echo", "still"])).stdout == b"still\n"

    asyncio.run(asyncio.wait_for(body(), HANG))
